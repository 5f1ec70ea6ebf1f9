# Two commands: `make demo` and `make test`. Everything else is a detail of those.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-all lint bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/lmforge demo

test: $(VENV)/.dev
	$(PY) -m pytest -q

test-all: $(VENV)/.dev
	$(PY) -m pytest -q -m ""

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check lmforge tests benchmarks

bench: $(VENV)/.dev  # about 35 minutes on 2 cores; rewrites the README's tables and benchmarks/results/
	$(PY) benchmarks/train_bench.py --compile --readme
	$(PY) benchmarks/train_bench.py --config mid --compile --memory-steps 10 --readme
	$(PY) benchmarks/train_bench.py --time-to-quality --readme
	$(PY) benchmarks/generate_bench.py --repeats 5 --readme

clean:
	rm -rf $(VENV) runs build *.egg-info
