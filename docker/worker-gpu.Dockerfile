# syntax=docker/dockerfile:1
# voxflow GPU worker: torch (CUDA build) + the voxflow core library. No Airflow.
# Serves inference stages; run it with the GPUs passed in:
#
#   docker build -f docker/worker-gpu.Dockerfile -t voxflow-worker-gpu .    # from the repo root
#   docker run --rm --gpus all voxflow-worker-gpu worker QUEUE_URL --kind inference
#
# No CUDA base image is needed: the torch wheel brings the CUDA user-space libraries (cuBLAS,
# cuDNN, NCCL, ...) as nvidia-* wheels; the host's NVIDIA driver (libcuda) is mounted in by
# the NVIDIA Container Toolkit (`--gpus`), so the torch build must suit the host's driver.
# The default is PyTorch's CUDA 12.6 build of torch (needs driver >= 560), which runs on the
# GCE backend's default GPU boot image (driver 570; voxflow/groups/gce.py: GPU_BOOT_IMAGE,
# CUDA_MIN_DRIVER; tests/test_docker.py checks the pair). torch 2.13.0 has no CUDA 12.8 build.
# Its PyPI wheel is the CUDA 13.0 build: driver >= 580, and the one with Blackwell kernels; on
# a boot image with such a driver, build with
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 (or https://pypi.org/simple).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

COPY requirements.txt docker/requirements.sh /tmp/build/
RUN sh /tmp/build/requirements.sh worker /tmp/build/requirements.txt > /tmp/build/worker.txt \
 && pip install --index-url "$TORCH_INDEX_URL" "$(grep -E '^torch==' /tmp/build/worker.txt)" \
 && pip install -r /tmp/build/worker.txt \
 && rm -rf /tmp/build

# voxflow itself (only the core package: operators/ would need Airflow).
COPY pyproject.toml README.md /tmp/src/
COPY voxflow /tmp/src/voxflow
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src

# Models live under /opt/voxflow/models in every voxflow image (Airflow's plan task loads the
# same path to check it): the demo model is here; derived images add theirs.
COPY voxflow/demo/rsunet.py voxflow/demo/rsunet.safetensors /opt/voxflow/models/demo/

RUN groupadd --gid 10001 voxflow \
 && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin voxflow
USER 10001:10001
WORKDIR /home/voxflow
ENV VOXFLOW_HOME=/home/voxflow/.voxflow

# SIGTERM (docker stop, a Spot VM's preemption notice) makes the worker release its leases
# at once and exit; the exec-form ENTRYPOINT makes voxflow PID 1, so it gets the signal.
STOPSIGNAL SIGTERM
ENTRYPOINT ["voxflow"]
CMD ["worker", "--help"]
