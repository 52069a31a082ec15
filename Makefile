# photoz: two commands do all set-up. `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= model/bundles/photoz-sdss-sim.onnx
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: serve test lint install install-dev ship docker-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# serving install: no torch
$(VENV)/.serve-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

# training + test install; torch pinned first so pip takes the CPU wheel
# and, on Python >= 3.11 (RAIL's floor), the RAIL stages (integrations/rail), editable in compat mode so that
# RAIL's discovery (pkgutil over the rail namespace) finds them
$(VENV)/.dev-installed: $(BIN)/python pyproject.toml integrations/rail/pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,dev]'
	if $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
		$(BIN)/pip install --quiet -e ./integrations/rail --config-settings editable_mode=compat; fi
	touch $@ $(VENV)/.serve-installed

install: $(VENV)/.serve-installed
install-dev: $(VENV)/.dev-installed

serve: $(VENV)/.serve-installed
	@test -f $(MODEL) || { echo "No model bundle at $(MODEL): train and export one (see docs/training.md) or set MODEL=path.onnx"; exit 1; }
	$(BIN)/photoz serve --model $(MODEL) --host $(HOST) --port $(PORT)

# the suite in TEST_WORKERS processes (pytest-xdist; 2 suits a 2-core machine, TEST_WORKERS=0 runs it in this one);
# tests marked xdist_group (modules with costly module fixtures) stay together on one worker
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# ruff (lint + import order) over the repository; mypy over every room and the RAIL stages (--strict for
# photoz.model, formats and service: pyproject.toml); import-linter's contracts on which room imports which (pyproject.toml). mypy and
# import-linter cannot follow setuptools' editable import hook, so they read the photoz namespace from a tree of
# hard links to the folders' files, run from inside it.
TYPECHECK := build/typecheck
lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/photoz
	cp -al $(CURDIR)/photoz/*.py $(TYPECHECK)/photoz/
	for room in model formats service pipeline training; do cp -al $(CURDIR)/$$room $(TYPECHECK)/photoz/$$room; done
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p photoz
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
		$(CURDIR)/integrations/rail/src/rail/photoz $(CURDIR)/integrations/rail/src/rail/estimation/algos/photoz_image.py
	cd $(TYPECHECK) && PYTHONPATH=. $(CURDIR)/$(BIN)/lint-imports $(CURDIR)/pyproject.toml --no-cache

# Build the CPU image with buildah from a debootstrap base (no Docker engine needed) and smoke-test it;
# DOCKER_GPU=1 also builds and checks the CUDA image.
docker-test: $(VENV)/.dev-installed
	$(BIN)/python -m tests.e2e.docker_smoke $(if $(DOCKER_GPU),--gpu,)

clean:
	rm -rf $(VENV) .pytest_cache build

# Release CHECKPOINT of RUN as MODEL with its card: `photoz ship` (see `photoz ship --help`; several checkpoints: a
# deep ensemble; PIT_MAP: a `photoz calibrate-pit` report applied in the graph).
RUN      ?= runs/default
TRAIN_H5 ?= data/sim-train.h5
TEST_H5  ?= data/sim-test.h5
VERSION  ?= 0.1.0
CHECKPOINT ?= $(RUN)/best.pt
PIT_MAP  ?=
ship: $(VENV)/.dev-installed
	$(BIN)/photoz ship --run $(RUN) --checkpoint $(CHECKPOINT) --train-data $(TRAIN_H5) --test-data $(TEST_H5) \
		--version $(VERSION) --out $(MODEL) $(if $(PIT_MAP),--pit-map $(PIT_MAP),)
