# Fashion-MNIST classifier images, four targets:
#   serve (default)  the prediction API: gunicorn + Flask on port 8000, with the bundled model
#   api              the same without a model (Kubernetes/KServe mount one at MODEL_DIR)
#   train            `python -m training ...`, with the real Fashion-MNIST from Debian (works offline)
#   proxy            the front door (HAProxy and nginx from Debian) that docker-compose.yml puts before the api
#
#   docker build -t fashion-mnist:serve .                                        # CPU-only torch
#   docker build --target train -t fashion-mnist:train .
#   docker build --build-arg TORCH_INDEX_URL= -t fashion-mnist:serve-cuda .      # CUDA torch (pip's default index)
#
# Layers go from rarely to often changed: the locked dependencies and torch, then the model and the code,
# so a code change rebuilds only the last small layers.

# The base image is an ARG so it can be pinned by digest without editing this file:
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest> .
# (`docker buildx imagetools inspect python:3.11-slim` prints the digest; compose passes PYTHON_IMAGE when
# set.) The default stays a tag because an engine without registry access, like the offline test machine,
# holds a locally built python:3.11-slim that has no registry digest, and a pinned reference fails there.
ARG PYTHON_IMAGE=python:3.11-slim
# PyTorch's CPU-only wheel index keeps the image small; an empty value means pip's default index,
# whose Linux torch wheels are the CUDA build (several GB), which compose.gpu.yaml uses. Declared once
# here; the stages that install torch or torchvision take it with a bare `ARG TORCH_INDEX_URL`.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# A fixed non-root uid/gid, so a host folder can be made writable for it (see docker-compose.yml).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app


# ---- requirements: the training extras, read from pyproject.toml (one source of truth) ----
# A stage of its own: later stages COPY the list by content, so a pyproject.toml edit that leaves
# the dependencies alone (tool settings, test extras) reinstalls nothing.
FROM base AS requirements
WORKDIR /build
COPY pyproject.toml ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
open("requirements-train.txt", "w").write("\n".join(p["optional-dependencies"]["train"]) + "\n")'


# ---- build: the virtual environment: locked dependencies, then torch ----
FROM base AS build
ARG TORCH_INDEX_URL
WORKDIR /build
RUN python -m venv /opt/venv
COPY constraints.txt requirements/serve.txt ./
# Everything but torch comes from the lock file with its SHA-256 hashes (Pillow decodes untrusted
# uploads: it must not float), torch's own pure-Python dependencies included, so the torch install
# after it adds only torch (and, for the CUDA build, its nvidia-* libraries), pinned by constraints.txt.
# The cache mount keeps downloaded wheels across rebuilds without putting them in a layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes --no-deps -r serve.txt \
    && pip install -c constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch \
    && pip check


# ---- runtime: the venv with what serving needs; shared by serve and train so torch is stored once ----
FROM base AS runtime
COPY --from=build /opt/venv /opt/venv
COPY --from=build /build/constraints.txt /build/
WORKDIR /app
# The version is pyproject.toml's; tests/test_container.py checks that this default and the installed
# package agree (a LABEL cannot read a file). Labels both targets share come after the installs (a
# change here reinstalls nothing); each target adds its title, description and revision last, since
# the revision changes with every commit.
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"


# ---- wheel: the project itself, built once as a wheel and installed into each target ----
# Installed, not copied, so the package metadata is there: /v2 and /openapi.json report the real version.
# On the small base image, so a code change costs this stage and one install layer per target.
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY fashion/ fashion/
COPY service/ service/
COPY training/ training/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels .


# ---- train: python -m training, arguments pass through ----
FROM runtime AS train
# torchvision (training only), from the same index as torch.
ARG TORCH_INDEX_URL
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c /build/constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torchvision
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
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-deps --no-index /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER app


# ---- proxy: the front door (docker-compose.yml), HAProxy and nginx from Debian on the same base image ----
# Why both and what each does: proxy/haproxy.cfg, proxy/nginx.conf and the README's "The front door".
# proxy/entrypoint.sh runs them side by side, as the image's user.
FROM base AS proxy
RUN apt-get update \
    && apt-get install -y --no-install-recommends haproxy nginx \
    && rm -rf /var/lib/apt/lists/*
EXPOSE 8000
# SIGUSR1: the entry point passes it to HAProxy (its soft stop: stop listening, finish the requests it
# accepted), then stops nginx gracefully.
STOPSIGNAL SIGUSR1
# GET /readyz through the proxy: healthy when the front door reaches at least one ready replica.
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/etc/fashion-proxy/healthcheck.py"]
ENTRYPOINT ["/etc/fashion-proxy/entrypoint.sh"]
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="fashion-mnist-proxy" \
      org.opencontainers.image.description="HAProxy + nginx front door for the Fashion-MNIST classifier API" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}" \
      org.opencontainers.image.revision="${REVISION}"
COPY service/healthcheck.py /etc/fashion-proxy/healthcheck.py
COPY proxy/ /etc/fashion-proxy/
USER app


# ---- api: the prediction API without a model (Kubernetes/KServe mount one at MODEL_DIR) ----
FROM runtime AS api
# Bind all interfaces inside the container; publishing the port decides who can reach it.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    MODEL_DIR=/app/models \
    PYTHONDONTWRITEBYTECODE=1
EXPOSE 8000
# Standard library only (no curl in the image). Importing the `service` package loads neither Flask
# nor torch (create_app is imported lazily), so the check costs milliseconds.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["gunicorn", "-c", "/app/gunicorn.conf.py", "service:create_app()"]
ARG REVISION=unknown
LABEL org.opencontainers.image.title="fashion-mnist-serve" \
      org.opencontainers.image.description="Fashion-MNIST classifier API: POST an image to /predict, get softmax probabilities" \
      org.opencontainers.image.revision="${REVISION}"
# The project, installed (byte-compiled by pip while the filesystem is still writable); gunicorn's
# config is linked where the entry point names it.
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-deps --no-index /tmp/wheels/*.whl && rm -rf /tmp/wheels \
    && ln -s "$(python -c 'import pathlib, service; print(pathlib.Path(service.__file__).with_name("gunicorn.conf.py"))')" \
        /app/gunicorn.conf.py
USER app


# ---- serve (default target: the last stage): api plus the bundled model, for compose and `docker run` ----
FROM api AS serve
# The bundled model; compose mounts ./models over it, read-only.
COPY models/ models/
