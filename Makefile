# The README's two commands: `make demo` and `make test`. Both create or reuse .venv.
# torch==2.13.0 is named because its CPU build lies on this machine's disk (pyproject's range, 2.13.x, would let
# a resolver pick another, and any other torch pulls a multi-GB CUDA build). scripts/install_deps.py installs with
# uv (half pip's CPU: the set-up counts in make test's 8 minutes) under pip's own index settings, or with pip.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench bench-peers bench-noise lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python scripts/install_deps.py torch==2.13.0 -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check elastic launch examples bench tests scripts
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python examples/elastic_demo.py

bench: $(STAMP)
	mkdir -p bench/out
	$(BIN)/python bench/throughput.py | tee bench/out/throughput.txt
	$(BIN)/python bench/reshard.py | tee bench/out/reshard.txt
	$(BIN)/python bench/recovery.py | tee bench/out/recovery.txt
	$(BIN)/python bench/lora.py | tee bench/out/lora.txt
	$(BIN)/python bench/grpo_phases.py | tee bench/out/grpo_phases.txt
	$(BIN)/python bench/rollout.py | tee bench/out/rollout.txt
	$(BIN)/python bench/load.py | tee bench/out/load.txt
	$(BIN)/python bench/plan_scale.py --quick | tee bench/out/plan_scale.txt
	$(BIN)/python bench/failures.py | tee bench/out/failures.txt
	$(BIN)/python bench/to_readme.py

bench-peers: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	mkdir -p bench/out
	RAY_TRAIN_V2_ENABLED=1 $(BIN)/python bench/peers.py | tee bench/out/peers.txt
	RAY_TRAIN_V2_ENABLED=1 $(BIN)/python bench/goodput.py | tee bench/out/goodput.txt
	$(BIN)/python bench/to_readme.py

# The bandit study: 8 minutes on 2 cores at load 6-10 (2026-12-07); `--quick` under a minute; `--gradient` and
# `--lm` (about 40 minutes, not yet run in full) add the other studies. Prints verdicts, never fails.
bench-noise: $(STAMP)
	mkdir -p bench/out
	$(BIN)/python bench/grpo_noise.py | tee bench/out/grpo_noise.txt

lint: $(STAMP)
	$(BIN)/ruff check elastic launch examples bench tests scripts

clean:
	rm -rf $(VENV) .pytest_cache runs
