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

.PHONY: install test test-slow demo bench clean

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

# pytest exits 5 when it collected nothing: that is a failure here, never a silent pass.
test: install
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/medfusion demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
