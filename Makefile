# Everything a fresh machine needs: `make test` and `make demo` build .venv from nothing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint docs bench bench-ideas bench-quick trials clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch and torchvision are pinned here (not in pyproject) to the builds this machine serves locally.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m ocd_hf.demo

# lint + format check, the docs site in strict mode, then the fast tests
test: lint $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

test-all: lint $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

# the documentation site (mkdocs-material + an API reference from the docstrings) into site/
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The paper's tables (4 tasks x 3 seeds, hours on a CPU: docs/results.md gives the wall time per seed;
# resumes from build/bench-runs), the paper's other tasks (TinyNeRF, speech separation over 2-5 sources, ViT; 3 seeds each),
# the speed table, then docs/results.md. DATA is the folder with
# vision/, tabular/, text/. The benchmarks are the modules of the benchmarks package (python -m).
DATA ?= ../shared/data
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.paper_tables --jobs 2 --no-ideas --data-root $(DATA)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.task_nerf --seeds 0 1 2 --figure docs/examples/tinynerf.png
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.task_speech --num-sources 2 3 4 5 --seeds 0 1 2
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.task_vit --seeds 0 1 2 --data-root $(DATA)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.speed
	$(BIN)/python -m benchmarks.render_results

# The paper tables with the issue-8 variants (held-out collection budget, guidance, ensembles, gating; about
# 1.7x the time of the plain tables) into docs/results/ideas/
bench-ideas: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.paper_tables --jobs 2 --data-root $(DATA) --runs-dir build/bench-runs-ideas --out-dir docs/results/ideas

# the same benchmarks at toy sizes (a smoke test; `make test-all` runs it through tests/test_benchmarks_quick.py)
bench-quick: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.paper_tables --quick --data-root $(DATA) --out-dir build/bench-quick --runs-dir build/bench-quick/runs --force
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.speed --quick --out-dir build/bench-quick

# What a new user gets: the README's MiniLM snippet and every example, each run as written from a cold start
# and timed (wall, CPU, load) into docs/results/user_trials.md; resumes from build/user-trials (--force reruns)
trials: $(STAMP)
	$(BIN)/python -m benchmarks.user_trials --data-root $(DATA)

clean:
	rm -rf $(VENV) build site *.egg-info src/*.egg-info
