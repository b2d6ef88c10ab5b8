# aeserve on the CPU (ONNX Runtime's CPU build). Two images from one file:
#
#   docker build -t aeserve:cpu-slim .                    # target `slim` (the default): the service, ONNX only
#   docker build -t aeserve:cpu-full --target full .      # + torch (CPU) and the train extra
#
# slim: every op the store exports as ONNX, no torch in the image. The saliency half of attention-map
#       needs a torch.export program: without torch it answers 501 (`saliency_unavailable`), and
#       `?saliency=false` still returns the attention matrix.
# full: the same service with saliency, plus `python -m training build-store`, which the compose file's
#       one-shot `store` service runs to build the default store into the `models` volume.
# The GPU images are Dockerfile.gpu. Nothing is downloaded at run time: the store is a mounted volume
# (AESERVE_STORE=/models), built from the recipes and committed data copied into the full image.
#
# Pins: ONNX Runtime and torch are the versions the test suite runs; the rest follows pyproject.toml.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    AESERVE_STORE=/models
RUN useradd --no-log-init --system --uid 10001 --user-group --create-home --home-dir /home/aeserve aeserve

# Dependencies only (cached until pyproject.toml changes): with no package sources copied yet,
# `pip install ".[extras]"` installs the dependencies and an empty aeserve distribution.
FROM python-base AS deps-slim
ARG ONNXRUNTIME_VERSION=1.32.0
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -m venv /opt/venv \
    && echo "onnxruntime==${ONNXRUNTIME_VERSION}" > /src/constraints.txt \
    && pip install --no-cache-dir -c /src/constraints.txt ".[cpu]"

FROM deps-slim AS deps-full
ARG TORCH_VERSION=2.13.0
# The CPU wheel of torch (PyPI's Linux wheels are CUDA builds, gigabytes of CUDA libraries unused here).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN echo "torch==${TORCH_VERSION}" >> /src/constraints.txt \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir -c /src/constraints.txt ".[cpu,torch,train]"

FROM deps-slim AS build-slim
COPY app ./app
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import importlib.util as u, app.main; \
assert u.find_spec('torch') is None, 'torch leaked into the slim image'; \
assert u.find_spec('training') is None, 'the training package leaked into the slim image'"

FROM deps-full AS build-full
COPY app ./app
COPY training ./training
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import torch, onnxruntime, app.main, training.build_store; \
assert torch.version.cuda is None, 'a CUDA build of torch in the CPU image'; \
print('torch', torch.__version__, 'onnxruntime', onnxruntime.__version__)"

# The full image: service with saliency + store builder (`python -m training build-store`).
FROM python-base AS full
COPY --from=build-full /opt/venv /opt/venv
COPY model_store/recipes /opt/aeserve/recipes
# A named volume mounted here starts with this owner, so the non-root store builder can write to it.
RUN mkdir /models && chown 10001:10001 /models
WORKDIR /home/aeserve
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "8000"]

# The slim image (default target): the service, ONNX only.
FROM python-base AS slim
COPY --from=build-slim /opt/venv /opt/venv
WORKDIR /home/aeserve
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "8000"]
