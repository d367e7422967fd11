# The README's two commands. Each creates .venv with plain pip on first use; the stamp
# file makes a second run install nothing unless pyproject.toml changed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= projects/demo

# make bench: the bench extra (the peers of benchmarks/loader.py) and annbatch's own
# Python 3.12 venv (benchmarks/out/annbatch-venv), then the three benchmarks. The scale
# benchmark runs its three default points at 100 genes per cell (see README).
BENCH_STAMP := $(VENV)/.bench-installed
LOADER_ARGS ?=
COMPILE_ARGS ?=
SCALE_ARGS ?= --median-genes 100

.PHONY: demo test lint venv clean-demo bench bench-setup

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) -c "from benchmarks.loader import annbatch_python; py, why = annbatch_python(); print(f'annbatch venv: {py} ({why})' if py else f'WARNING: no annbatch venv, the annbatch row will be skipped: {why}')"
	@touch $(BENCH_STAMP)

bench-setup: $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/loader.py $(LOADER_ARGS)
	$(PY) benchmarks/compile.py $(COMPILE_ARGS)
	$(PY) benchmarks/scale.py $(SCALE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	@test -d $(DEMO)/data || $(PY) -m preprocess.synth PATH.PROJECT_PATH=$(DEMO) synth.pretrained_dim=32
	$(PY) -m preprocess.compile PATH.PROJECT_PATH=$(DEMO)
	$(PY) -m preprocess.verify PATH.PROJECT_PATH=$(DEMO)
	$(PY) -m concept.train --config-name demo PATH.PROJECT_PATH=$(DEMO)
	$(PY) -m concept.embed checkpoint=latest PATH.PROJECT_PATH=$(DEMO) input=$(DEMO)/data/synth_cxg/h5ads/hs_csr_e.h5ad output=$(DEMO)/embedded/hs_csr_e.h5ad
	$(PY) -m concept.evaluate checkpoint=latest PATH.PROJECT_PATH=$(DEMO)

clean-demo:
	rm -rf $(DEMO)
