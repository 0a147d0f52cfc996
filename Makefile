# The two set-up commands:  make demo   |   make test
# Both create .venv when it is missing. torch is installed first, on its own and only when it
# is not importable, so the project's `torch>=2.6` is already satisfied and pip never picks a
# multi-GB CUDA build by itself; later installs name TORCH_SPEC again, so no package can move
# torch. Override per platform, e.g.
#   make test TORCH_SPEC="torch==2.6.0" TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
PYTHON         ?= python3
VENV           ?= .venv
PY             := $(VENV)/bin/python
PIP            := $(PY) -m pip
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS    ?=

.PHONY: demo test lint bench clean

$(VENV)/.torch-ok:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.base-ok: $(VENV)/.torch-ok pyproject.toml
	$(PIP) install -e . "$(TORCH_SPEC)"
	touch $@

$(VENV)/.test-ok: $(VENV)/.torch-ok pyproject.toml
	$(PIP) install -e ".[test,plot]" "$(TORCH_SPEC)"
	touch $@ $(VENV)/.base-ok

demo: $(VENV)/.base-ok
	$(PY) launch/demo.py

# ruff (lint and format) and mypy, configured in pyproject.toml; `make test` runs them first.
LINT_PATHS := dist_guardian tests benchmarks launch
lint: $(VENV)/.test-ok
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.test-ok
	$(PY) benchmarks/bench_load_save.py

clean:
	rm -rf $(VENV) demo-out benchmarks/out
