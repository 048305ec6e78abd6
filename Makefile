# Two commands do all the set-up on a fresh machine (Python 3.11 + pip, no GPU, no hub access):
#   make demo    builds .venv if missing, then runs the offline end-to-end demo
#   make test    builds .venv if missing, then runs the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test clean

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

clean:
	rm -rf $(VENV) demo-out .pytest_cache
