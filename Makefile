# `make test` and `make run` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The Multi30k copy beside the checkout, when there is one; otherwise the code downloads it.
NMT_DATA_DIR ?= $(if $(wildcard ../shared/data/multi30k),$(abspath ../shared/data/multi30k),)
export NMT_DATA_DIR
MODEL ?= models/default
BUNDLE ?= bundles/default
# What `make run` serves: a model repository (NAME/VERSION/ bundles) of the committed models,
# English -> German (models/default, exported to BUNDLE) the default, English -> French beside it.
REPOSITORY ?= bundles/repository
DEFAULT_MODEL ?= en-de

.PHONY: test run serve bundle evaluate train-default image-test image-cuda constraints bench-load bench-decode bench-train protos clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build first, so `torch>=2.4` below is already satisfied (no multi-GB CUDA download).
	$(BIN)/pip install -q torch==2.13.0
	# The tested versions (deploy/constraints), so that a fresh clone runs what the image runs.
	$(BIN)/pip install -q -c deploy/constraints/cpu.txt -c deploy/constraints/export.txt -e '.[train,dev]'
	touch $@

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# Main job: serve both language pairs over gRPC (exporting their bundles first when there are none);
# requests that name no model get en-de.
run: serve
serve: $(REPOSITORY)/en-de/1/manifest.json $(REPOSITORY)/en-fr/1/manifest.json
	NMT_MODEL_REPOSITORY=$(REPOSITORY) NMT_DEFAULT_MODEL=$(DEFAULT_MODEL) $(BIN)/nmt-serve

bundle: $(BUNDLE)/manifest.json
$(BUNDLE)/manifest.json: $(VENV)/.installed
	$(BIN)/nmt-export $(MODEL) $(BUNDLE) --force
# en-de version 1 is BUNDLE itself (the benchmarks' bundle), linked rather than exported twice.
$(REPOSITORY)/en-de/1/manifest.json: $(BUNDLE)/manifest.json
	mkdir -p $(REPOSITORY)/en-de && ln -sfn $(abspath $(BUNDLE)) $(REPOSITORY)/en-de/1
$(REPOSITORY)/en-fr/1/manifest.json: $(VENV)/.installed
	$(BIN)/nmt-export models/en-fr $(REPOSITORY)/en-fr/1 --force

# The CPU image built and run with buildah (no Docker engine needed): scripts/image_test.sh.
image-test: $(VENV)/.installed
	BIN=$(BIN) scripts/image_test.sh

# The GPU image: onnxruntime-gpu 1.31.1 (CUDA 13, cuDNN 9) on the matching CUDA base; run it with
# `docker run --gpus all -p 50051:50051 -p 9090:9090 nmt:cuda`. DOCKER=podman or "buildah bud" work too.
DOCKER ?= docker
CUDA_IMAGE ?= nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
image-cuda:
	$(DOCKER) build -t nmt:cuda --build-arg DEVICE=cuda --build-arg RUNTIME_IMAGE=$(CUDA_IMAGE) .

# deploy/constraints/*.txt, the image's pinned versions, from this (tested) environment; run it
# after changing dependencies or upgrading .venv.
constraints: $(VENV)/.installed
	$(BIN)/python scripts/constraints.py

# Benchmarks: write bench/results/{decode,load,train}.{json,md,png}.
bench-decode: $(VENV)/.installed
	$(BIN)/nmt-bench decode --force
bench-train: $(VENV)/.installed
	$(BIN)/nmt-bench train
bench-load: $(BUNDLE)/manifest.json
	$(BIN)/nmt-bench load --bundle $(BUNDLE)

# Regenerates server/nmt_pb and server/kserve_pb from protos/ (a test fails when they are stale).
protos: $(VENV)/.installed
	$(BIN)/python -m nmt.server.protogen

evaluate: $(VENV)/.installed
	$(BIN)/nmt-eval --checkpoint $(MODEL) --split test_2016_flickr
	$(BIN)/nmt-eval --checkpoint $(MODEL) --split test_2017_flickr

# Retrains the default model (README: "How models/default was made"): about 80 minutes on 2 CPU
# cores, a GPU when there is one. Run it again after an interruption: it resumes (TRAIN_FLAGS=--force
# starts over). The result replaces models/default.
TRAIN_DIR ?= runs/default
TRAIN_FLAGS ?=
train-default: $(VENV)/.installed
	PYTHON=$(abspath $(BIN)/python) scripts/train_default.sh $(TRAIN_DIR) $(TRAIN_FLAGS)
	rm -rf $(MODEL).new && cp -r $(TRAIN_DIR)/model $(MODEL).new && rm -rf $(MODEL) && mv $(MODEL).new $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
