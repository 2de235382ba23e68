# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEST ?= pixelmill-demo

.PHONY: setup debs demo test bench bench-extra bench-gcs bench-memory bench-rerun bench-scale bench-inputs bench-renditions clean

setup: $(STAMP)

# constraints.txt pins the whole tree (PLATFORM.md's versions and what they pulled in).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/pixelmill demo $(DEST)

# Debian packages the tests use when missing: chromium for the gallery's browser test
# (playwright drives it; nothing downloaded) and postgresql for a Prefect server on PostgreSQL.
DEBS = $(if $(shell command -v chromium),,chromium fonts-dejavu-core) \
       $(if $(wildcard /usr/lib/postgresql/*/bin/initdb),,postgresql)
debs:
	@missing="$(strip $(DEBS))"; [ -z "$$missing" ] || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      $$missing >/dev/null; \
	  else echo "missing: sudo apt-get install $$missing" >&2; exit 1; fi; }

test: setup debs
	$(BIN)/python -m pytest

# The rivals of `make bench` (Daft, Ray Data): the optional `bench` extra, never part of setup.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench-extra: $(BENCH_STAMP)

# pixelmill vs the kernel ceiling, the predecessors and the rivals (600 camera JPEGs; IMAGES=
# SIZE= change it; BENCH_ARGS="--rows ceiling,pm-auto" picks rows)
IMAGES ?= 600
SIZE ?= 3000x2000
# The default rows include the rivals, so the extra is installed for them; with --rows in
# BENCH_ARGS it is not (`make bench-extra` installs it).
bench: setup $(if $(findstring --rows,$(BENCH_ARGS)),,$(BENCH_STAMP))
	$(BIN)/python bench/speed.py --images $(IMAGES) --size $(SIZE) $(BENCH_ARGS)

# local->local vs gcs->gcs (emulator) on the same 200 images, printed as a ratio
bench-gcs: setup
	$(BIN)/python bench/gcs_vs_local.py

# driver peak memory for 5,000 small images against 200, printed as a ratio
bench-memory: setup
	$(BIN)/python bench/memory.py

# 20,000 small images: the same command again, and again after 1 % new images, as ratios
# of the first run's time
bench-rerun: setup
	$(BIN)/python bench/rerun.py

# 200,000 small images end to end (against the kernel ceiling), a dry run over 1,000,000
# listed files and discovery's object reads in the GCS emulator (SCALE_ARGS= changes them)
bench-scale: setup
	$(BIN)/python bench/scale.py $(SCALE_ARGS)

# 3 sizes x 2 formats from one decode against one rendition, on 400 6 MP camera JPEGs
bench-renditions: setup
	$(BIN)/python bench/renditions.py

# pixelmill over Pillow's own test images (fetched from the registry): made, failed, not images
bench-inputs: setup
	$(BIN)/python bench/inputs.py

clean:
	rm -rf $(VENV) *.egg-info
