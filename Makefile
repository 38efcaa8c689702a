# make train / make test: each creates .venv (Python 3.11, the pinned CPU build of torch, which the test extra's
# torch>=2.4 then accepts instead of PyPI's CUDA build, and the package with its test extras) when it is missing or
# pyproject.toml changed, then trains on the embedded data or runs the suite. Extra flags: make train ARGS="--steps 100".
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: train test

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/python train.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2
