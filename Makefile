# Two commands from nothing: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch that lies on this machine's disk; GPU users install their own first.
TORCH_PIN ?= torch==2.13.0

HOST ?= 127.0.0.1
PORT ?= 8080
MODEL ?= bundled:smollm2-135m-instruct

.PHONY: venv constraints run serve test lint bench-engine bench-capacity bench-activator bench-retries bench-features bench-prefix-cache bench-dtype bench-memory-guard fetch-model clean simulate

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# After upgrading packages in .venv (and `make test` passing): record their versions.
constraints: $(STAMP)
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -vi '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

fetch-model: $(STAMP)
	$(PY) -m runtime.models.bundled

# The embedded mesh: activator on $(PORT), autoscaler, $(PODS) runtime pods, functions/examples.
# It prints how to call it: the OpenAI API at http://$(HOST):$(PORT)/v1 with model = function name.
PODS ?= 2
run: $(STAMP) fetch-model
	$(PY) -m runtime.cli up --functions-dir functions/examples --pods $(PODS) --host $(HOST) --port $(PORT)

# One runtime pod serving $(MODEL) directly (no activator or autoscaler).
serve: $(STAMP)
	$(PY) -m runtime.cli serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy runtime functions autoscaler activator

# BENCH_ARGS passes options to a benchmark, e.g. BENCH_ARGS="--seed 5 --length-scale 0.2".
bench-engine: $(STAMP)
	$(PY) bench/bench_engine.py $(BENCH_ARGS)

# The configuration of the README's capacity verdict (seed 5, lengths x0.2, rate and R pinned so
# every run sees the same arrivals and SLO; ~70 min). BENCH_ARGS replaces it: BENCH_ARGS=--quick
# is a 3-minute smoke run, BENCH_ARGS="--seed 2" the bench's own defaults on another seed.
CAPACITY_ARGS ?= --seed 5 --length-scale 0.2 --duration 240 --rate-per-fn 0.02554 --prefill-rate 123.2 --show-misses
bench-capacity: $(STAMP)
	$(PY) bench/bench_capacity.py $(or $(BENCH_ARGS),$(CAPACITY_ARGS))

bench-activator: $(STAMP)
	$(PY) bench/bench_activator.py $(BENCH_ARGS)

bench-retries: $(STAMP)
	$(PY) bench/bench_retries.py $(BENCH_ARGS)

bench-features: $(STAMP)
	$(PY) bench/bench_features.py $(BENCH_ARGS)

bench-prefix-cache: $(STAMP)
	$(PY) bench/bench_prefix_cache.py $(BENCH_ARGS)

bench-dtype: $(STAMP)
	$(PY) bench/bench_dtype.py $(BENCH_ARGS)

# Needs root and a writable /sys/fs/cgroup: pods under a real memory limit.
bench-memory-guard: $(STAMP)
	$(PY) bench/memory_guard.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Issue 4's check: SLO-met(slinfer) / SLO-met(sllm) at 128 functions on 4 GPUs, without and with
# 4 CPU nodes, for three models (needs ../shared/data; see autoscaler/sim/cli.py). SIM_ARGS adds
# options, e.g. SIM_ARGS=--sweep.
SIM_TRACE ?= ../shared/data/traces/azure_30min_128fn.json
SIM_MODELS ?= llama-3.2-3b llama-2-7b llama-2-13b
SIM_ARGS ?=
simulate: $(STAMP)
	@for m in $(SIM_MODELS); do for c in 0 4; do \
	  $(PY) -m runtime.cli simulate --trace $(SIM_TRACE) --model $$m --cpus $$c --gpus 4 \
	    --systems sllm,slinfer --out sim-out/$$m-cpus$$c $(SIM_ARGS) | tail -1 || exit 1; \
	done; done
