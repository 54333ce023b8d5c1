# `make test` and `make run` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The Multi30k copy beside the checkout, when there is one; otherwise the code downloads it.
NMT_DATA_DIR ?= $(if $(wildcard ../shared/data/multi30k),$(abspath ../shared/data/multi30k),)
export NMT_DATA_DIR
MODEL ?= models/default

.PHONY: test run evaluate train-default clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build first, so `torch>=2.4` below is already satisfied (no multi-GB CUDA download).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# Main job (until the server lands): evaluate the default model on both Multi30k test sets.
run: evaluate
evaluate: $(VENV)/.installed
	$(BIN)/nmt-eval --checkpoint $(MODEL) --split test_2016_flickr --beam 4
	$(BIN)/nmt-eval --checkpoint $(MODEL) --split test_2017_flickr --beam 4

# Retrains the default model (see README: "How models/default was made").
train-default: $(VENV)/.installed
	PYTHON=$(abspath $(BIN)/python) scripts/train_default.sh runs/gpu

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
