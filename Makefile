# Two entry points: `make demo` (the main job) and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to 2.13: this machine image serves it as a local CPU wheel. Elsewhere set
	# PIP_EXTRA_INDEX_URL to PyTorch's CPU-only wheel index to get the CPU build instead of CUDA's.
	$(PY) -m pip install -q "torch==2.13.*"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m moge demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_layer.py

clean:
	rm -rf $(VENV) runs .pytest_cache
