# syntax=docker/dockerfile:1
# TensorRT engine builder: NVIDIA's TensorRT container of the same release as
# the Triton image (24.10: same TensorRT, so Triton can load the plans) plus
# tierdet's stdlib-only engines.py and the generated gpu configs. It runs once
# per start on the GPU host (compose `engine-builder`, Helm init container):
# cached plans are reused, failing models are reported and left out.
# Build from the repository root:
#   docker build -f docker/engines.Dockerfile -t tierdet-engines:0.1.0 .

FROM nvcr.io/nvidia/tensorrt:24.10-py3
COPY service/tierdet/build/engines.py /opt/tierdet/engines.py
COPY model_repository/gpu/ /opt/tierdet/model_repository/gpu/
RUN install -d -o 10001 -g 10001 /var/lib/tierdet
ENV HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TIERDET_HOME=/var/lib/tierdet
USER 10001:10001
# A job that exits when done: nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT ["python3", "/opt/tierdet/engines.py"]
CMD ["build"]
