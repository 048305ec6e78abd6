# Set-up and checks on a fresh machine (Python 3.11 + pip, no GPU, no hub access); each target builds .venv first:
#   make demo       the offline end-to-end demo
#   make test       the whole test suite (the README's test command; CI runs it)
#   make test-fast  the tests not marked slow (pytest -m "not slow"), under 90 s on 2 cores
#   make lint       ruff (lint + format check) and import-linter's contracts (pyproject.toml)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# import-linter reads packages from the file tree, so the import namespace (export/ is edge_lora.export, ...) is
# laid out as it installs, in a scratch copy
IMPORTS_TREE := build/imports

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first, pinned: on the target machines 2.13.0 is a local CPU wheel, while a bare "torch"
	# requirement would pull a multi-GB CUDA build.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edge-lora demo --workdir demo-out

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(IMPORTS_TREE) && mkdir -p $(IMPORTS_TREE)
	cp -r edge_lora $(IMPORTS_TREE)/edge_lora
	for d in export runtime devices; do cp -r $$d $(IMPORTS_TREE)/edge_lora/$$d; done
	cd $(IMPORTS_TREE) && PYTHONPATH=. $(CURDIR)/$(VENV)/bin/lint-imports $(CURDIR)/pyproject.toml

clean:
	rm -rf $(VENV) demo-out .pytest_cache build
