# syntax=docker/dockerfile:1
# byolkit images. Two targets:
#   cpu  the Gradio app and the embedded byolkit server (ONNX Runtime; python:3.11-slim), non-root
#   gpu  training, export and GPU serving (CUDA runtime base, torch with CUDA, onnxruntime-gpu), non-root
#
#   docker build --target cpu -t byolkit:cpu .
#   docker build --target gpu -t byolkit:gpu .
#
# Each target is built in a *-build stage into a virtual environment (/opt/venv) that the final stage
# copies alone: no pip cache, no sources, no build tools in the final image. Both final stages run as
# the same user (uid 10001) so that the named volumes /runs, /models and /indexes are shared between
# them. Verified only statically here (hadolint, tests/test_docker.py): no image was built.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch and torchvision from the PyTorch CPU wheel index (no CUDA libraries: a few hundred MB, not GBs);
# pyproject.toml's ranges, so that the project install below finds them satisfied
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        "torch>=2.3,<2.15" "torchvision>=0.18,<0.30"
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY trainer ./trainer
COPY export ./export
COPY serving ./serving
COPY app ./app
# the app (faiss, gradio, onnxruntime, tritonclient) and the embedded server (nvidia-pytriton's tritonserver);
# versions are pyproject.toml's ranges (numpy < 2 for nvidia-pytriton)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[app,serve]" \
    && python -c "import app, export.onnx, serving.server, trainer.pretrain, faiss, gradio, onnxruntime, pytriton"

# ---------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-build
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Ubuntu 22.04's Python 3.10 (requires-python >= 3.10); the base image's tag pins the release
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.10 python3.10-venv libpython3.10 \
    && rm -rf /var/lib/apt/lists/*
RUN python3.10 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY trainer ./trainer
COPY export ./export
COPY serving ./serving
COPY app ./app
# torch from PyPI (its Linux wheels are the CUDA 12 builds); then onnxruntime-gpu in place of the CPU
# onnxruntime that the export/serve/app extras bring (both install the same `onnxruntime` module)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[app,export,serve,gpu]" \
    && pip uninstall -y onnxruntime onnxruntime-gpu \
    && pip install --no-cache-dir "onnxruntime-gpu>=1.18" \
    && python -c "import app, export.onnx, serving.server, trainer.pretrain, torch, onnxruntime, pytriton"

# ---------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
# the interpreter the venv was made with, and libpython for the tritonserver bundled with nvidia-pytriton
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.10 libpython3.10 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group byol \
    && mkdir -p /runs /models /indexes /data \
    && chown byol:byol /runs /models /indexes
COPY --from=gpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    BYOLKIT_HEALTH_URL=http://127.0.0.1:8000/v2/health/ready
USER 10001:10001
WORKDIR /runs
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['BYOLKIT_HEALTH_URL'], timeout=4)"]
# the byolkit server on the GPU, over the model repository that export.triton wrote into /models
CMD ["python", "-m", "serving.server", "--model", "/models", "--host", "0.0.0.0", "--device", "cuda"]

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --create-home --uid 10001 --user-group byol \
    && mkdir -p /runs /models /indexes /data \
    && chown byol:byol /runs /models /indexes
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False \
    BYOLKIT_HEALTH_URL=http://127.0.0.1:7860/
USER 10001:10001
WORKDIR /runs
EXPOSE 7860 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['BYOLKIT_HEALTH_URL'], timeout=4)"]
# the main job on the image set shipped with byolkit (train 2 minutes, export, index, serve the page);
# docker-compose.yml runs the app on a built index instead
CMD ["python", "-m", "app", "--work", "/runs/quickstart", "--no-progress", "--host", "0.0.0.0", "--port", "7860"]
