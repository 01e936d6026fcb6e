# Every target creates .venv on first use: torch first (TORCH_SPEC picks the wheel, so a GPU
# machine gets a CUDA build), then this package with its dev extra. A stamp file makes later
# runs skip the install until pyproject.toml changes.
#
#   CPU (the default here):  make demo
#   CPU wheel from PyTorch:  make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
#   GPU, CUDA 12.4:          make demo TORCH_SPEC="torch==2.6.0 --index-url https://download.pytorch.org/whl/cu124"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Part of the suite: make test PYTEST_ARGS="tests/test_config.py -x"
PYTEST_ARGS ?=
CHROMIUM ?= /usr/bin/chromium
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint cluster-up cluster-down cluster-status browser

demo: $(STAMP)
	$(PY) cluster/demo.py --config jobs/configs/toy.yaml

test: $(STAMP) browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

cluster-up: $(STAMP)
	$(PY) cluster/local.py up

cluster-down: $(STAMP)
	$(PY) cluster/local.py down

cluster-status: $(STAMP)
	$(PY) cluster/local.py status

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e '.[dev]'
	touch $@

# Chromium + chromedriver drive the Serve page tests; a missing browser is a warning, not a failure.
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) \
	      || echo "warning: apt-get could not install chromium; the browser tests need it"; \
	  else \
	    echo "warning: $(CHROMIUM) is missing and apt-get is unavailable (or not root);" \
	         "install chromium and chromium-driver for the browser tests"; \
	  fi; \
	fi
