# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEST ?= pixelmill-demo

.PHONY: setup demo test bench-gcs clean

setup: $(STAMP)

# constraints.txt pins the whole tree (PLATFORM.md's versions and what they pulled in).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/pixelmill demo $(DEST)

test: setup
	$(BIN)/python -m pytest

# local->local vs gcs->gcs (emulator) on the same 200 images, printed as a ratio
bench-gcs: setup
	$(BIN)/python bench/gcs_vs_local.py

clean:
	rm -rf $(VENV) *.egg-info
