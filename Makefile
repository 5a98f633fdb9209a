# Set-up and main entry points. Everything installs into ./.venv.
# TORCH_SPEC picks the torch build; the default takes the CPU wheel that lies on this machine's disk.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP = $(VENV)/bin/pip
PY = $(VENV)/bin/python

.PHONY: setup demo test bench clean

setup: $(VENV)/.ganslim-installed

$(VENV)/.ganslim-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/ganslim demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench_compress.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
