# kto_lightning developer commands. `make` or `make help` lists them.
PYTHON ?= python
# The CPU build on machines without a GPU; see README.md for a CUDA build.
TORCH ?= torch==2.13.0

.DEFAULT_GOAL := help
.PHONY: help install install-dev train test lint format clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: ## Install torch, then the package (editable)
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e .

install-dev: ## Install torch, then the package with test and lint tools
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e ".[dev]"

train: install ## Train the embedded default (tiny model, bundled task, CPU); ARGS="key=value ..."
	$(PYTHON) -m kto_lightning.train $(ARGS)

test: install-dev ## Run the test suite
	$(PYTHON) -m pytest

lint: ## ruff lint and format check, mypy on src/
	ruff check src tests
	ruff format --check src tests
	mypy

format: ## Apply ruff fixes and formatting
	ruff check --fix src tests
	ruff format src tests

.PHONY: bench
bench: ## Install TRL; steps against its KTOTrainer, data preparation, packed vs padded, online sampling (~35 min, CPU); ARGS="--smoke"
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e ".[bench]"
	$(PYTHON) benchmarks/bench.py $(ARGS)
	$(PYTHON) benchmarks/data_prep.py $(if $(filter --smoke,$(ARGS)),--rows 2000)
	$(PYTHON) benchmarks/packing.py $(if $(filter --smoke,$(ARGS)),--steps 2)
	$(if $(filter --smoke,$(ARGS)),,$(PYTHON) benchmarks/online_demo.py --seeds 1)

.PHONY: bench-online
bench-online: ## Online against offline KTO on the consistency task: held-out reward, sampling tokens/s and share of a step (~15 min, CPU)
	$(PYTHON) benchmarks/online_demo.py $(ARGS)

.PHONY: bench-data
bench-data: ## Time data preparation alone: ours and TRL's, cold and warm cache; ARGS="--rows 200000 --skip-trl"
	$(PYTHON) -m pip install -e ".[bench]"
	$(PYTHON) benchmarks/data_prep.py $(ARGS)

.PHONY: tiny-weights
tiny-weights: ## Retrain the default's bundled tiny model: SFT on the toy task, seeded (~2 min, CPU)
	$(PYTHON) scripts/tiny_weights.py $(ARGS)

clean: ## Remove run outputs and caches
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
