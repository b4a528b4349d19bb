# One entry point for people and CI. `make test` builds the venv on a fresh machine.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install serve train test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

serve: install
	HOST=$(HOST) PORT=$(PORT) $(VENV)/bin/gunicorn -c service/gunicorn.conf.py "service:create_app()"

train: install
	$(PY) -m training $(ARGS)

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

# The in-process tests only (no gunicorn, browser, container, GPU or training run): under 30 s.
test-fast: install
	$(PY) -m pytest -m "not server and not slow and not container and not browser and not gpu" $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: install
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_serving.py
	$(PY) benchmarks/bench_v2.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-artifacts
