# syntax=docker/dockerfile:1
# One-shot model builder: downloads official weights (sha256-verified), exports
# ONNX with `tierdet build` into TIERDET_HOME (the model volume) and assembles
# the `cpu` Triton repository there. Models already built in the current export
# format are kept (see docker/build-missing.sh). Build from the repository root:
#   docker build -f docker/model-builder.Dockerfile -t tierdet-model-builder:0.1.0 .

FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
# The `build` extra brings torch; PyTorch's CPU index serves torch/torchvision
# as +cpu builds, which win over PyPI's CUDA builds (GBs the export never uses).
# Versions are pinned in pyproject.toml, not on this command line.
# hadolint ignore=DL3013
RUN pip wheel --wheel-dir /wheels --extra-index-url https://download.pytorch.org/whl/cpu ".[build]" \
 && python -m venv --without-pip /opt/tierdet \
 && pip --python /opt/tierdet/bin/python install --no-index --find-links /wheels "tierdet[build]"

FROM python:3.11-slim-bookworm
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && groupadd --system --gid 10001 tierdet \
 && useradd --system --uid 10001 --gid tierdet --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin tierdet \
 && install -d -o 10001 -g 10001 /var/lib/tierdet
COPY --from=builder /opt/tierdet /opt/tierdet
COPY --chmod=0755 docker/build-missing.sh /usr/local/bin/tierdet-build-missing
# A named volume mounted at /var/lib/tierdet starts with this folder's owner (10001).
ENV PATH=/opt/tierdet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TIERDET_HOME=/var/lib/tierdet
USER 10001:10001
VOLUME ["/var/lib/tierdet"]
# A job that exits when done: nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT ["tierdet-build-missing"]
CMD ["official", "cpu", "efficientdet-d0"]
