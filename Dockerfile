# Fashion-MNIST classifier images, two targets:
#   serve (default)  the prediction API: gunicorn + Flask on port 8000, with the bundled model
#   train            `python -m training ...`, with the real Fashion-MNIST from Debian (works offline)
#
#   docker build -t fashion-mnist:serve .                                        # CPU-only torch
#   docker build --target train -t fashion-mnist:train .
#   docker build --build-arg TORCH_INDEX_URL= -t fashion-mnist:serve-cuda .      # CUDA torch (pip's default index)
#
# Layers go from rarely to often changed: torch, then the other dependencies, then the model and the code,
# so a code change rebuilds only the last small layers.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# A fixed non-root uid/gid, so a host folder can be made writable for it (see docker-compose.yml).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app


# ---- requirements: the dependency lists, read from pyproject.toml (one source of truth) ----
# A stage of its own: later stages COPY the lists by content, so a pyproject.toml edit that leaves
# the dependencies alone (tool settings, test extras) reinstalls nothing.
FROM base AS requirements
WORKDIR /build
COPY pyproject.toml ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
open("requirements.txt", "w").write("\n".join(p["dependencies"]) + "\n"); \
open("requirements-train.txt", "w").write("\n".join(p["optional-dependencies"]["train"]) + "\n")'


# ---- build: the virtual environment with torch, the largest and most stable part ----
FROM base AS build
# PyTorch's CPU-only wheel index keeps the image small; an empty value means pip's default index,
# whose Linux torch wheels are the CUDA build (several GB), which compose.gpu.yaml uses.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /build
RUN python -m venv /opt/venv
COPY constraints.txt ./
# The cache mount keeps downloaded wheels across rebuilds without putting them in a layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch torchvision


# ---- runtime: the venv with what serving needs; shared by serve and train so torch is stored once ----
FROM base AS runtime
COPY --from=build /opt/venv /opt/venv
# The other dependencies go in a layer of their own on top: changing them does not copy torch again.
COPY --from=build /build/constraints.txt /build/
COPY --from=requirements /build/requirements.txt /build/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c /build/constraints.txt -r /build/requirements.txt
WORKDIR /app
# Labels both targets share (after the installs: a change here reinstalls nothing); each target adds its
# title, description and revision last, since the revision changes with every commit.
ARG PYTHON_IMAGE
LABEL org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"


# ---- code: the project's packages, byte-compiled, laid out per target ----
# Built on the small base image, so a code change costs one COPY into each target, not several steps
# on top of torch. checked-hash .pyc files stay valid whatever timestamps COPY gives the sources, and
# the containers' root filesystem is read-only, so nothing could write them at run time.
FROM base AS code
WORKDIR /src
COPY fashion/ fashion/
COPY service/ service/
COPY training/ training/
RUN python -m compileall -q --invalidation-mode checked-hash fashion service training \
    && mkdir -p /out/serve /out/train \
    && cp -a fashion service /out/serve/ \
    && cp -a fashion training /out/train/


# ---- train: python -m training, arguments pass through ----
FROM runtime AS train
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
COPY --from=requirements /build/requirements-train.txt /build/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c /build/constraints.txt -r /build/requirements-train.txt
# The Debian files are decompressed per run into /tmp (a tmpfs under compose), so the image carries the
# data once and any uid can train; the model goes to /app/models, a mounted host folder.
ENV FASHION_DATA=/tmp/fashion-mnist \
    MPLCONFIGDIR=/tmp/matplotlib
RUN install -d -o app -g app /app/models
ENTRYPOINT ["python", "-m", "training"]
CMD []
ARG REVISION=unknown
LABEL org.opencontainers.image.title="fashion-mnist-train" \
      org.opencontainers.image.description="Trains the Fashion-MNIST classifier: python -m training [args]" \
      org.opencontainers.image.revision="${REVISION}"
USER app
COPY --from=code /out/train/ /app/


# ---- api: the prediction API without a model (Kubernetes/KServe mount one at MODEL_DIR) ----
FROM runtime AS api
# Bind all interfaces inside the container; publishing the port decides who can reach it.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    MODEL_DIR=/app/models \
    PYTHONDONTWRITEBYTECODE=1
EXPOSE 8000
# Standard library only (no curl in the image); run as a file so it does not import torch.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/service/healthcheck.py"]
ENTRYPOINT ["gunicorn", "-c", "service/gunicorn.conf.py", "service:create_app()"]
ARG REVISION=unknown
LABEL org.opencontainers.image.title="fashion-mnist-serve" \
      org.opencontainers.image.description="Fashion-MNIST classifier API: POST an image to /predict, get softmax probabilities" \
      org.opencontainers.image.revision="${REVISION}"
USER app
COPY --from=code /out/serve/ /app/


# ---- serve (default target): api plus the bundled model, for `docker compose up` and `docker run` ----
FROM api AS serve
# The bundled model; compose mounts ./models over it, read-only.
COPY models/ models/
