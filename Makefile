# The README's two commands: `make demo` and `make test`. Each installs into .venv first;
# a second run skips the install while setup.cfg is unchanged.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: install demo test lint format clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[data,test]'
	touch $(STAMP)

demo: install
	$(BIN)/jaxlm-train --config experiments/pylm_tiny.py --workdir $(DEMO_DIR)
	$(BIN)/jaxlm-generate --workdir $(DEMO_DIR) --prompt 'def ' --max_new_tokens 80 \
		--temperature 0.7 --top_k 40

# Both cores: pytest-xdist, a file per worker at a time (module fixtures are built once), one
# XLA compilation cache for the workers and their subprocesses (tests/conftest.py). Three workers
# on two cores: the tests also wait (on subprocesses, other processes, signals), and a third
# worker fills those waits (2026-12-03, this 2-core VM: 427 s of pytest against about 500 s).
test: install
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --durations=15 tests

lint: install
	$(BIN)/lint-imports --config setup.cfg
	$(BIN)/ruff check jaxlm tests experiments benchmarks
	$(BIN)/ruff format --check jaxlm tests experiments benchmarks

format: install
	$(BIN)/ruff format jaxlm tests experiments benchmarks
	$(BIN)/ruff check --fix jaxlm tests experiments benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
