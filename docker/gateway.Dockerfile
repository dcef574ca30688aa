# syntax=docker/dockerfile:1
# The gateway: HTTP :8080 and gRPC :50051 in front of Triton, started by
# `tierdet serve` (server.run_gateway, the same start-up code as `tierdet up`).
# Build from the repository root:
#   docker build -f docker/gateway.Dockerfile -t tierdet-gateway:0.1.0 .
# Runs as uid 10001 and writes nothing but /tmp (mount a tmpfs there), so the
# root filesystem can be read-only.

FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
# Wheels of tierdet and every dependency first, then a pip-less virtualenv
# installed from them alone: what reaches the final stage is only that venv.
# Versions are pinned in pyproject.toml, not on this command line.
# hadolint ignore=DL3013
RUN pip wheel --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/tierdet \
 && pip --python /opt/tierdet/bin/python install --no-index --find-links /wheels tierdet

FROM python:3.11-slim-bookworm
# The final stage installs nothing, so its packaging tools go too.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && groupadd --system --gid 10001 tierdet \
 && useradd --system --uid 10001 --gid tierdet --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin tierdet
COPY --from=builder /opt/tierdet /opt/tierdet
# HOME and every temporary file under /tmp (uploads above 1 MB spool there).
ENV PATH=/opt/tierdet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TIERDET_HTTP_HOST=0.0.0.0 \
    TIERDET_GRPC_HOST=0.0.0.0 \
    TIERDET_ACCESS_LOG=stderr
USER 10001:10001
EXPOSE 8080 50051
# python, not curl: the slim image has no curl, and the port follows TIERDET_HTTP_PORT.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TIERDET_HTTP_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["tierdet", "serve"]
