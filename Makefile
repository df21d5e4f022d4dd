# Fresh-machine set-up and checks. `make test` is the command CI runs (.ci/run).
# Everything goes into a virtual environment (.venv) so the machine's Python stays untouched.
# TORCH_SPEC picks the torch build: the default is the CPU wheel of this project's machines;
# on a GPU machine use e.g. `make test TORCH_SPEC=torch` (CUDA wheels; builds the .cu kernels).

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PINS ?=
STAMP := $(VENV)/.v2l-installed

.PHONY: setup test test-oldest lint bench clean demo gpu gpu-wheels

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q setuptools wheel "cmake>=3.25" ninja "pybind11>=2.12"
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(PINS)
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,serve]"
	touch $@

setup: $(STAMP)

lint: setup
	$(PY) -m ruff check .

test: setup lint
	$(PY) -c "import v2l_fast._C, v2l_fast; print('v2l_fast._C:', v2l_fast.build_info())"
	$(PY) -m pytest tests -q

# The same tests on the oldest versions pyproject.toml accepts, in their own venv (not in CI): the
# GPU machine's transformers 5.17 and triton 3.6, and peft 0.18 (0.17 does not import with
# transformers 5). torch stays 2.13: torch 2.11 has no CPU wheel on this project's registry.
test-oldest:
	$(MAKE) test VENV=.venv-oldest PINS="transformers==5.17.0 triton==3.6.0 peft==0.18.0"

# The main job on an embedded default (tiny random SmolVLM2, synthetic video; no downloads).
demo: setup
	$(PY) -m v2l_fast demo

bench: setup
	$(PY) -m pytest bench/ --benchmark

clean:
	rm -rf $(VENV) .venv-oldest build *.egg-info v2l_fast/_C*.so

# GPU runbook (see bench/NOTES.md, "GPU runbook"): on a GPU machine with torch, triton,
# transformers and peft preinstalled and no package registry, install v2l_fast offline into that
# python (no venv), build the CUDA extension, then run the issue-target benches (training step,
# TTFT, engine throughput), `pytest -m gpu tests/` and the other benches in timed stages. DRY_RUN=1 prints and checks the plan, running nothing.
# GPU_BUDGET=S fits the run into S seconds; RESUME=1 skips stages done in an earlier run;
# GPU_STAGES=a,b runs only those; GPU_OUT=DIR receives the stage log and a results tarball.
GPU_PYTHON ?= python3
GPU_ARGS ?=
gpu:
	$(GPU_PYTHON) scripts/gpu_runbook.py $(if $(DRY_RUN),--dry-run) $(if $(RESUME),--resume) \
		$(if $(GPU_BUDGET),--budget $(GPU_BUDGET)) $(if $(GPU_STAGES),--stages $(GPU_STAGES)) \
		$(if $(GPU_OUT),--out $(GPU_OUT)) $(GPU_ARGS)

# Prep for `make gpu`, on a machine where pip reaches a registry: the wheels the GPU machine
# lacks (PyAV, num2words, docopt) for its python 3.12 / x86-64, into wheels/ (git-ignored).
gpu-wheels:
	python3 scripts/gpu_wheels.py
