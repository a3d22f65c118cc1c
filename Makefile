# Two commands on a fresh machine: `make test` and `make demo` (README).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0
export RAY_ENABLE_UV_RUN_RUNTIME_ENV ?= 0

.PHONY: install lint format test test-slow demo clean

install: $(STAMP)

# CPU torch first (a bare `torch` requirement would pull a multi-GB CUDA build), then DeepSpeed
# without build isolation (its setup imports torch), then the package with its dev extra.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install packaging psutil py-cpuinfo ninja numpy
	$(PIP) install --no-build-isolation deepspeed
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

# The architecture is checked by tools (README "Layout"): ruff (lint and format) and import-linter's
# contracts in pyproject.toml. import-linter reads packages from one folder, so components/,
# pipelines/ and serve/ are laid out under medfusion/ in build/lint as the installed wheel has them.
LINT_TREE := build/lint
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(LINT_TREE) && mkdir -p $(LINT_TREE)
	cp -r platform/medfusion $(LINT_TREE)/medfusion
	for pkg in components pipelines serve; do cp -r $$pkg $(LINT_TREE)/medfusion/$$pkg; done
	PYTHONPATH=$(LINT_TREE) $(VENV)/bin/lint-imports pyproject.toml

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# pytest exits 5 when it collected nothing: that is a failure here, never a silent pass.
test: lint
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/medfusion demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
