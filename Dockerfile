# nmt-serve: the gRPC translation server with the committed models as a model repository,
# /opt/nmt/models/{en-de,en-fr}/1 (models/default and models/en-fr); requests naming no model get en-de.
#
#   docker build -t nmt:cpu .                                  # CPU image (onnxruntime)
#   docker build -t nmt:cuda --build-arg DEVICE=cuda \
#       --build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 .   # GPU (`make image-cuda`)
#   docker run --rm -p 50051:50051 -p 9090:9090 nmt:cpu
#   docker run --rm --gpus all -p 50051:50051 -p 9090:9090 nmt:cuda
#   docker run --rm -p 50051:50051 -v "$PWD/bundles/mine:/models/mine:ro" -e NMT_MODEL_DIR=/models/mine nmt:cpu
#   docker run --rm -p 50051:50051 -v "$PWD/repo:/models:ro" -e NMT_MODEL_REPOSITORY=/models \
#       -e NMT_DEFAULT_MODEL=mine -e NMT_REPOSITORY_POLL_SECONDS=30 nmt:cpu     # your own repository
#
# Stages: `builder` installs torch (CPU) and exports the models to bundles; the runtime image
# has only the server's dependencies (`.[serve]` or `.[gpu]`, no torch) and those bundles. Every pip
# install is pinned by deploy/constraints/ (generated from the tested environment: make constraints).
# Without network access to TORCH_INDEX_URL, put a torch wheel in build/wheels/ (scripts/image_test.sh does).

# DEVICE=cpu: onnxruntime (the `serve` extra) on python:3.11-slim. DEVICE=cuda: onnxruntime-gpu
# 1.31.1 (the `gpu` extra), a CUDA 13 + cuDNN 9 build, so RUNTIME_IMAGE must be a CUDA 13 cuDNN
# image: nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 (its Python is Ubuntu's 3.12); the build stops
# on any other. (One runtime stage with the base as an argument, not one stage per device: buildah
# cannot pick a stage by an argument.) The CUDA image's default is NMT_DEVICE=cuda: without a GPU it
# exits with an error instead of serving on the CPU.
ARG DEVICE=cpu
ARG PYTHON_IMAGE=python:3.11-slim
ARG RUNTIME_IMAGE=python:3.11-slim

# ---- builder: checkpoint -> bundle (torch lives only here) ----
FROM ${PYTHON_IMAGE} AS builder
# make image-test removes this stage's images (label nmt.stage=builder) after the build.
LABEL nmt.stage=builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# pyproject.toml keeps this COPY valid when build/wheels/ does not exist.
COPY pyproject.toml build/wheel[s] /wheels/
# The CPU build of torch: PyPI's linux wheel is the CUDA one (multi-GB with its nvidia-* deps).
RUN set -eu; \
    if ls /wheels/torch-"${TORCH_VERSION}"*.whl >/dev/null 2>&1; then \
        pip install --no-deps /wheels/torch-"${TORCH_VERSION}"*.whl; \
    else \
        pip install --no-deps "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; \
    fi
WORKDIR /src
COPY deploy/constraints /constraints
COPY pyproject.toml setup.py README.md ./
COPY engine engine
COPY training training
COPY export export
# torch's own dependencies (filelock, sympy, ...) come with `.[export]` from the default index.
RUN pip install --constraint /constraints/export.txt ".[export]"
COPY models/default models/en-de
COPY models/en-fr models/en-fr
# Only the variants the runtime can use (fp32 is always written); the export checks each one's
# parity against torch before writing the bundle. Without a GPU here, fp16-cuda's check is skipped
# (so recorded in the manifest) and nmt-serve runs the stored reference sentences when it starts.
ARG DEVICE
RUN set -eu; \
    variants=$([ "${DEVICE}" = cuda ] && echo fp16-cuda || echo fp32-cpu,int8-cpu); \
    for model in en-de en-fr; do \
        nmt-export "models/${model}" "/opt/nmt/models/${model}/1" --variants "$variants" --quiet; \
        nmt-export --verify "/opt/nmt/models/${model}/1"; \
    done

# ---- runtime: server dependencies + the bundle, non-root ----
FROM ${RUNTIME_IMAGE} AS runtime
ARG DEVICE
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# A CUDA base image has no Python: install the distribution's (python:3.11-slim has python3 -m venv).
# Its apt packages follow the base image tag (pinning them would break with each security update).
# hadolint ignore=DL3008
RUN set -eu; \
    case "${DEVICE}" in cpu|cuda) ;; *) echo "DEVICE must be cpu or cuda, got '${DEVICE}'" >&2; exit 1;; esac; \
    if [ "${DEVICE}" = cuda ] && { [ "${CUDA_VERSION:-}" = "${CUDA_VERSION#13.}" ] || [ -z "${NV_CUDNN_VERSION:-}" ]; }; then \
        echo "DEVICE=cuda installs onnxruntime-gpu for CUDA 13 + cuDNN 9: pass" \
             "--build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04" \
             "(this base has CUDA '${CUDA_VERSION:-none}', cuDNN '${NV_CUDNN_VERSION:-none}')" >&2; \
        exit 1; \
    fi; \
    if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY deploy/constraints /tmp/constraints
COPY pyproject.toml setup.py README.md /tmp/src/
# The engine (bundle contract, ORT sessions, search) and the server; setup.py packages only the
# folders present, so neither the exporter nor training code (nor torch) goes in.
COPY engine /tmp/src/engine
COPY server /tmp/src/server
RUN python3 -m venv /opt/venv \
    && extra=$([ "${DEVICE}" = cuda ] && echo gpu || echo serve) \
    && pip install --constraint "/tmp/constraints/${DEVICE}.txt" "/tmp/src[${extra}]" \
    && rm -rf /tmp/src /tmp/constraints \
    && pip uninstall -y -q pip setuptools \
    && useradd --uid 10001 --create-home --home-dir /home/nmt --shell /usr/sbin/nologin nmt
COPY --from=builder /opt/nmt/models /opt/nmt/models
USER 10001
WORKDIR /home/nmt
# NMT_MODEL_DIR, when given, wins over the repository (server/config.py): `-e NMT_MODEL_DIR=...` serves one bundle.
ENV NMT_MODEL_REPOSITORY=/opt/nmt/models NMT_DEFAULT_MODEL=en-de NMT_HOST=0.0.0.0 NMT_PORT=50051 NMT_METRICS_PORT=9090 NMT_DEVICE=${DEVICE}
EXPOSE 50051 9090
# SERVING only after the bundles are verified and the engine warmed up; start-period covers that.
# Exec form (no shell): nmt-client finds the server on localhost:$NMT_PORT by itself.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["nmt-client", "health", "--deadline", "3"]
# Exec form: nmt-serve is PID 1 and gets SIGTERM itself (it drains, then exits 0).
CMD ["nmt-serve"]
