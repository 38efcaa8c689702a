# make train / make test: each creates .venv (Python 3.11, torch 2.13.0, which the test extra's torch>=2.4 then
# accepts, and the package with its test extras) when it is missing or pyproject.toml changed, then trains on the
# embedded data or runs the suite. Extra flags: make train ARGS="--steps 100". PyPI's torch for Linux is a CUDA build
# of several GB; TORCH_INDEX=https://download.pytorch.org/whl/cpu takes PyTorch's CPU build from its own index.
PYTHON ?= python3.11
TORCH_INDEX ?=
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: train test

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/python train.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2
