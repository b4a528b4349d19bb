# One entry point for people and CI. `make test` builds the venv on a fresh machine.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install serve train test lint bench clean deploy-lint-tools

# checkov (security lint of deploy/ and the Dockerfile, run by tests/test_deploy.py) lives in a venv of
# its own: it pins old packaging and networkx that the project's own dependencies have outgrown.
LINT_VENV ?= $(VENV)/lint
CHECKOV   ?= checkov==3.3.30

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

$(LINT_VENV)/.installed:
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install -q '$(CHECKOV)'
	touch $@

deploy-lint-tools: $(LINT_VENV)/.installed

serve: install
	HOST=$(HOST) PORT=$(PORT) $(VENV)/bin/gunicorn -c service/gunicorn.conf.py "service:create_app()"

train: install
	$(PY) -m training $(ARGS)

test: install deploy-lint-tools
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: install
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_serving.py
	$(PY) benchmarks/bench_v2.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-artifacts
