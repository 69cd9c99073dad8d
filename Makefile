# Set-up and run targets. Each target creates the virtual environment on first use, so a fresh
# clone needs only Python 3.11+ and `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install bench

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, from the pin, so nothing later resolves a different build.
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,examples]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.digits.train

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples
	$(VENV)/bin/ruff format --check src tests examples

# The bench extra adds torchao (a peer in the tables) and matplotlib; its stamp keeps `make
# install` itself unchanged.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench]'
	touch $(BENCH_STAMP)

# Writes docs/benchmarks.md; about 10 minutes on 2 cores. `$(PY) -m benchmarks.run --help`
# lists --quick, --threads, --sections and --output.
bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run
