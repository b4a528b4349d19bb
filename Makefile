# One entry point for people and CI. On a fresh Debian/Ubuntu machine `make serve` and `make test` set
# everything up themselves (scripts/setup.sh): Debian packages when missing, the venv, the locked dependencies.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
export PYTHON

.PHONY: install install-test serve train test test-fast lint lock bench clean deploy-lint-tools

# checkov (security lint of deploy/ and the Dockerfile, run by tests/test_deploy.py) lives in a venv of
# its own: it pins old packaging and networkx that the project's own dependencies have outgrown.
LINT_VENV ?= $(VENV)/lint
CHECKOV   ?= checkov==3.3.30

# serve installs only what serving needs; test adds training and the test tools on top.
$(VENV)/.serve-installed: scripts/setup.sh requirements/serve.txt constraints.txt pyproject.toml
	scripts/setup.sh serve $(VENV)
	touch $@

$(VENV)/.test-installed: $(VENV)/.serve-installed requirements/test.txt
	scripts/setup.sh test $(VENV)
	touch $@

install: $(VENV)/.serve-installed
install-test: $(VENV)/.test-installed

$(LINT_VENV)/.installed:
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install -q '$(CHECKOV)'
	touch $@

deploy-lint-tools: $(LINT_VENV)/.installed

serve: install
	HOST=$(HOST) PORT=$(PORT) $(VENV)/bin/gunicorn -c service/gunicorn.conf.py "service:create_app()"

train: install-test
	$(PY) -m training --output-dir runs/$$(date -u +%Y%m%d-%H%M%S) $(ARGS)

test: lint deploy-lint-tools
	$(PY) -m pytest $(PYTEST_ARGS)

# The in-process tests only (no gunicorn, child process, browser, container, GPU or training run).
test-fast: install-test
	$(PY) -m pytest -m "not server and not cli and not slow and not container and not browser and not gpu" $(PYTEST_ARGS)

lint: install-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Regenerate requirements/*.txt (hash-pinned) after changing pyproject.toml's dependencies.
lock: install-test
	$(PY) -m pip install -q uv && PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) scripts/lock.py

bench: install-test
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_serving.py
	$(PY) benchmarks/bench_v2.py
	$(PY) benchmarks/bench_proxy.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-artifacts
