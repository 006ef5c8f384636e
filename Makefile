# Each target sets itself up: a .venv is created on first use and re-synced when a requirements
# file changes. PYTHON picks the interpreter that builds the venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: train test setup toy sweep bench bench-gpu clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) train.py

test: setup
	$(PY) -m pytest -q tests

# Rebuild the embedded default's base model and data (toy/) deterministically.
toy: setup
	$(PY) toy.py

# The paper in miniature (docs/results.md): accuracy vs trained parameters, RL vs SFT, on the toy.
# 93 runs: 14 minutes on 2 cores (docs/results.md); matplotlib (requirements-plot.txt) draws the plot.
$(VENV)/.plot-installed: $(VENV)/.installed requirements-plot.txt
	$(PY) -m pip install --quiet -r requirements-plot.txt
	touch $@

sweep: $(VENV)/.plot-installed
	$(PY) sweep.py

# Benchmarks print ratios against references measured in the same run (docs/performance.md).
$(VENV)/.bench-installed: $(VENV)/.installed requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $@

bench: $(VENV)/.bench-installed
	OMP_NUM_THREADS=1 $(PY) bench/bench_svd.py
	$(PY) bench/bench_rollout.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_grpo_memory.py

# The same comparisons on a CUDA GPU in bf16 (docs/performance.md); budgeted at 200 s (--budget),
# not yet run on a GPU.
bench-gpu: $(VENV)/.bench-installed
	$(PY) bench/bench_gpu.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
