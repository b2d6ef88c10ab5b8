# aeserve inference service, GPU image.
#
#   docker build -t aeserve:latest .
#   docker run --gpus all -p 8000:8000 -v "$PWD/model_store:/models:ro" aeserve:latest
#
# The model store is MOUNTED, not baked in: build it on the host (`make store`, which needs the
# training extras and minutes of compute) and mount it read-only at /models (AESERVE_STORE). The
# image then stays free of training code, and new model versions ship without a rebuild.
#
# Python stack: the CUDA build of torch (the saliency op runs a torch.export program) plus the
# `.[gpu,torch]` extras, i.e. onnxruntime-gpu only; the build fails if the CPU `onnxruntime` wheel
# or a CPU-only torch wheel ends up in the environment. The CUDA/cuDNN libraries come from the
# nvidia-* wheels torch depends on; they are registered with ldconfig so onnxruntime-gpu finds them
# too. Pick TORCH_INDEX_URL so torch's CUDA major matches the one onnxruntime-gpu is built for.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
# PyPI's Linux x86_64 torch wheels are CUDA builds; a download.pytorch.org/whl/cuXXX index works too.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv \
    && echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# Dependencies first (cached until pyproject.toml changes): core + the gpu and torch extras.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = p['optional-dependencies']; \
open('/tmp/requirements.txt', 'w').write('\n'.join(p['dependencies'] + extras['gpu'] + extras['torch']))" \
    && pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt
COPY app ./app
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import importlib.metadata as md, torch; \
names = {d.metadata['Name'].lower().replace('_', '-') for d in md.distributions()}; \
assert torch.version.cuda, 'a CPU-only torch wheel was installed'; \
assert 'onnxruntime-gpu' in names, 'onnxruntime-gpu missing'; \
assert 'onnxruntime' not in names, 'the CPU onnxruntime wheel would shadow onnxruntime-gpu'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda)"

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    AESERVE_STORE=/models
RUN useradd --no-log-init --system --uid 10001 --user-group --create-home --home-dir /home/aeserve aeserve
COPY --from=builder /opt/venv /opt/venv
# Let onnxruntime-gpu load the CUDA / cuDNN libraries shipped in the nvidia-* wheels.
RUN find /opt/venv/lib/python3.*/site-packages/nvidia -maxdepth 3 -type d -name lib \
        > /etc/ld.so.conf.d/zz-nvidia-wheels.conf \
    && ldconfig
WORKDIR /home/aeserve
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
