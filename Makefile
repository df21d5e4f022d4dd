# Fresh-machine set-up and checks. `make test` is the command CI runs (.ci/run).
# Everything goes into a virtual environment (.venv) so the machine's Python stays untouched.
# TORCH_SPEC picks the torch build: the default is the CPU wheel of this project's machines;
# on a GPU machine use e.g. `make test TORCH_SPEC=torch` (CUDA wheels; builds the .cu kernels).

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.v2l-installed

.PHONY: setup test lint bench clean demo

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q setuptools wheel "cmake>=3.25" ninja "pybind11>=2.12"
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

setup: $(STAMP)

lint: setup
	$(PY) -m ruff check .

test: setup lint
	$(PY) -c "import v2l_fast._C, v2l_fast; print('v2l_fast._C:', v2l_fast.build_info())"
	$(PY) -m pytest tests -q

# The main job on an embedded default (tiny random SmolVLM2, synthetic video; no downloads).
demo: setup
	$(PY) -m v2l_fast demo

bench: setup
	$(PY) -m pytest bench/ --benchmark

clean:
	rm -rf $(VENV) build *.egg-info v2l_fast/_C*.so
