# dicom_assets — every set-up step lives here, so `make demo` and `make test` work on a fresh
# Debian machine with Python 3.11, 3.12 or 3.13.
SHELL := /bin/bash
# The interpreter for a new .venv: python3 if it is 3.11–3.13, else python3.13, python3.12 or
# python3.11 (scripts/bootstrap.sh --which-python); choose one with `make PYTHON=/path/to/python3.12`.
PYTHON ?= $(shell scripts/bootstrap.sh --which-python)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-installed-stamp
DEMO_DIR ?= demo-work

.PHONY: install demo test dev services bench clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	scripts/bootstrap.sh "$(PYTHON)" "$(VENV)"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/dicom-assets demo --workdir $(DEMO_DIR)

dev: install
	$(BIN)/dicom-assets dev --workdir $(DEMO_DIR)

test: install services
	$(BIN)/python -m pytest

services:
	scripts/ensure-services.sh

# The benchmark's extras (matplotlib for the chart) are installed here only, so `make test` stays lean.
$(BENCH_STAMP): $(STAMP)
	scripts/bootstrap.sh "$(PYTHON)" "$(VENV)" test,bench
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) services
	$(BIN)/python -m benchmarks.run --out benchmarks/results.md

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
