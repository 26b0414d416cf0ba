# The two commands of a fresh machine: `make demo` and `make test`. Each creates .venv when missing and
# installs the project into it; the stamp file makes a second run install nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mdlda-installed
WORKDIR ?= demo_work

# Quiet, local, token-free Ray for tests and the demo: Ray 2.59+ turns token auth on for local clusters.
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_DEDUP_LOGS ?= 0
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast ablation bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mdlda demo-data --out $(WORKDIR)/data --size small
	$(BIN)/mdlda run --config tune_spaces/demo.yaml --data $(WORKDIR)/data --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=15

# the edit loop: the unit tests only, no Ray started (tests on a Ray fixture must be marked slow: conftest.py)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m "not slow"

# baseline vs AdaBN vs DANN teachers vs ensemble vs student over 3 seeds on the demo data (about an hour on 2 CPUs)
ablation: $(STAMP)
	$(BIN)/mdlda demo-data --out $(WORKDIR)/data --size small
	$(BIN)/mdlda ablation --config tune_spaces/demo.yaml --data $(WORKDIR)/data --workdir $(WORKDIR) --seeds 3

bench: $(STAMP)
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/parquet_write.py
	$(BIN)/python bench/train.py --trials 2
	$(BIN)/python bench/train_step.py --width 16 --steps 3

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(WORKDIR) .pytest_cache
