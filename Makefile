# The README's two commands. Each creates .venv with plain pip on first use; the stamp
# file makes a second run install nothing unless pyproject.toml changed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= projects/demo

.PHONY: demo test lint venv clean-demo

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)

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
