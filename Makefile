# Two commands on a fresh machine (Python 3.11, CPU, no Docker):
#   make demo   set up, train a LoRA adapter on a tiny model through Cog's server, chat with it
#   make test   set up and run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo serve serve-train test lint schema bench bench-smoke image push weights clean

# `make serve` / `make serve-train`: Cog's server on this checkout, with the demo's tiny model
# and trained weights unless given (make serve BASE_MODEL=... WEIGHTS=... PORT=... HOST=...
# SLOTS=...; WEIGHTS= serves the plain base; SLOTS: predictions at once, COG_MAX_CONCURRENCY).
BASE_MODEL ?= demo-output/tiny-llama
WEIGHTS ?= demo-output/weights.tar
HOST ?= 127.0.0.1
SLOTS ?= 16

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	# torch pinned in the same call: unpinned, peft and bitsandbytes pull a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0 -r requirements-dev.txt
	touch $@

demo: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m tools.demo

serve: $(BIN)/.installed
	BASE_MODEL="$(BASE_MODEL)" COG_WEIGHTS="$(WEIGHTS)" COG_MAX_CONCURRENCY="$(SLOTS)" \
	  $(BIN)/python -m tools.serve predict \
	  --port $(or $(PORT),5002) --host $(HOST)

serve-train: $(BIN)/.installed
	BASE_MODEL="$(BASE_MODEL)" $(BIN)/python -m tools.serve train --port $(or $(PORT),5001) \
	  --host $(HOST)

test: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.run

bench-smoke: $(BIN)/.installed  # the CPU harness, and the GPU script's training and serving
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.run --smoke --out "$$(mktemp -d)"
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.gpu --smoke --sections training,serving \
	  --out "$$(mktemp -d)"

# The image with the versions the tests ran: cog.yaml pins the SDK (build.sdk_version); Cog
# resolves coglet at build time unless COGLET_WHEEL names one.
image:
	COGLET_WHEEL=pypi:0.23.1 cog build

push:  # make push MODEL=r8.im/<you>/<model>
	COG_MODEL=$(MODEL) COGLET_WHEEL=pypi:0.23.1 cog push

weights:  # make weights MODEL=r8.im/<you>/<model> HF_TOKEN=hf_... (once; then commit weights.lock)
	COG_MODEL=$(MODEL) HF_TOKEN=$(HF_TOKEN) cog weights import

schema: $(BIN)/.installed
	$(BIN)/python -m tools.cog_openapi

clean:
	rm -rf $(VENV) demo-output .cog .pytest_cache
