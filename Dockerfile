# tusou (图搜) on the CPU: the embedded store, the model built into the image, a non-root user, /data a volume.
#
#   docker build -t tusou .
#   docker run -d --name tusou -p 8000:8000 -v tusou-data:/data tusou
#   docker logs tusou          # the first start prints an access key (see docs/deploy.md)
#
# BASE may name any Debian-like image with python3 (>= 3.11) and its venv module, e.g. one made locally
# with mmdebstrap where no registry is reachable (docs/deploy.md). MODEL: lite0, lite1 or lite2.
# PRECISION (fp32 or int8) and INPUT_SIZE (empty: the model's own) pick the graph built into the image; the
# model folder is read-only at run time, so they are build arguments, not run-time settings.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG MODEL=lite0
ARG PRECISION=fp32
ARG INPUT_SIZE=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/tusou/bin:$PATH \
    TUSOU_MODEL=${MODEL} \
    TUSOU_MODEL_PRECISION=${PRECISION} \
    TUSOU_MODEL_INPUT_SIZE=${INPUT_SIZE} \
    TUSOU_MODEL_DIR=/opt/tusou/models \
    TUSOU_DATA=/data \
    TUSOU_HOST=0.0.0.0 \
    TUSOU_PORT=8000

COPY pyproject.toml README.md LICENSE /src/
COPY tusou /src/tusou
RUN python3 -m venv /opt/tusou \
    && /opt/tusou/bin/pip install /src \
    && rm -rf /src

# Build the model's ONNX graph now (TUSOU_MODEL_DIR, read-only at run time): a container starts without it.
RUN python -c "from tusou.config import Settings; from tusou.embed import create_embedder; create_embedder(Settings())" \
    && chmod -R a+rX /opt/tusou/models

# HOME outside the volume: ONNX Runtime keeps a small cache there that is not data.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/tusou \
        --shell /usr/sbin/nologin tusou \
    && mkdir -p /data && chown tusou:tusou /data && chmod 700 /data
USER tusou
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000

# /healthz answers 200 once the model and the store are loaded, 503 if the store fails.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TUSOU_PORT', '8000') + '/healthz', timeout=4)"]

CMD ["tusou", "serve"]
