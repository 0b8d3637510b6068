# Two entry points: `make demo` (the main job) and `make test`. Both build .venv from nothing, with the
# exact versions of requirements/lock.txt. `make test-latest` runs the same suite on the newest versions
# pyproject.toml allows (a separate .venv-latest), so dependency drift shows before users see it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOCK   := requirements/lock.txt
# pip itself is pinned too: a new pip release must not change how the lock is installed.
PIP_PIN := pip==26.3

.PHONY: demo test test-latest lock venv bench clean

$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(PIP_PIN)"
	# The lock pins torch 2.13.0+cpu: this machine image serves it as a local wheel. Elsewhere set
	# PIP_EXTRA_INDEX_URL to PyTorch's CPU-only wheel index (https://download.pytorch.org/whl/cpu).
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m moge demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

# Newest releases within pyproject's ranges (torch stays 2.13: the machine's CPU build). Not used by CI.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q "torch==2.13.*"
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" "torch==2.13.*"
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(transformers|tokenizers|safetensors|peft|accelerate|numpy|huggingface.hub)=='
	.venv-latest/bin/python -m pytest -q

# Regenerate the lock from pyproject.toml with pip-tools (pip's resolver, so it sees the local CPU torch).
lock:
	test -x .venv-tools/bin/pip-compile || ($(PYTHON) -m venv .venv-tools && .venv-tools/bin/pip install -q "$(PIP_PIN)" "pip-tools==7.6.2")
	.venv-tools/bin/pip-compile -q --upgrade pyproject.toml requirements/torch.in --extra test -o $(LOCK) \
	    --no-emit-find-links --no-emit-index-url --strip-extras --allow-unsafe

bench: $(STAMP)
	$(PY) benchmarks/bench_layer.py

clean:
	rm -rf $(VENV) .venv-latest .venv-tools runs .pytest_cache
