# Set-up and main entry points. Everything installs into ./.venv; the official-code tests also use
# ./.venv-official (the official repositories' environment, see below).
# TORCH_SPEC picks the torch build; the default takes the CPU wheel that lies on this machine's disk.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP = $(VENV)/bin/pip
PY = $(VENV)/bin/python

# The environment the official pytorch-CycleGAN-and-pix2pix / SPADE / CartoonGAN code runs in (they need
# torchvision; this pair installs from the machine's package mirror), with ganslim installed into it the
# way the adapters' READMEs tell a user: `pip install -e .` without extras, which must keep its torch.
VENV_OFFICIAL ?= .venv-official
OFFICIAL_TORCH ?= 2.14.1
OFFICIAL_TORCHVISION ?= 0.29.1
PIP_OFFICIAL = $(VENV_OFFICIAL)/bin/pip
# test processes (pytest-xdist), one thread each (tests/conftest.py): one per core of the 2-core CI
# machine runs the suite in about 0.6 of one process's time; TEST_WORKERS=0 runs it in this process
TEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

.PHONY: setup setup-official demo test test-fast bench clean

setup: $(VENV)/.ganslim-installed

$(VENV)/.ganslim-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,all]"
	touch $@

setup-official: $(VENV_OFFICIAL)/.ganslim-installed

$(VENV_OFFICIAL)/.ganslim-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_OFFICIAL)
	$(PIP_OFFICIAL) install -q "torch==$(OFFICIAL_TORCH)" "torchvision==$(OFFICIAL_TORCHVISION)" dominate dill scikit-image
	$(PIP_OFFICIAL) install -q -e .
	$(VENV_OFFICIAL)/bin/python -c "import torch, torchvision, ganslim; v = torch.__version__; \
		assert v.startswith('$(OFFICIAL_TORCH)'), f'installing ganslim changed torch to {v}'; print('$(VENV_OFFICIAL): torch', v, 'ganslim', ganslim.__version__)"
	touch $@

demo: setup
	$(VENV)/bin/ganslim demo

# the whole suite, with the official-code integration tests (tests/test_official_*.py)
test: setup setup-official
	GANSLIM_OFFICIAL_PYTHON=$(abspath $(VENV_OFFICIAL))/bin/python $(PYTEST)

# without the official-code tests (no .venv-official needed)
test-fast: setup
	$(PYTEST) --ignore-glob='tests/test_official_*'

bench: setup
	$(PY) benchmarks/bench_compress.py

clean:
	rm -rf $(VENV) $(VENV_OFFICIAL) runs .pytest_cache .hypothesis
