# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick clean

# torch is pinned to the CPU wheel on this machine's disk; any looser requirement
# pulls a multi-GB CUDA build.  The stamp makes a second run reuse .venv.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvw-ledger demo

lint: $(STAMP)
	$(VENV)/bin/ruff check kvw_ledger tests benchmarks examples
	$(VENV)/bin/mypy kvw_ledger

test: lint
	$(VENV)/bin/pytest

# Speed, memory and scale side by side, the unlearning frontier (issue 7) and a forget's
# fixed cost before and after the fingerprint cache (issue 11, benchmarks/fixedcost.py):
# writes benchmarks/results.json and benchmarks/RESULTS.md.
bench: $(STAMP)
	$(PY) benchmarks/run.py

# The same suite, small: under 5 minutes; writes results-quick.json / RESULTS-quick.md.
bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
