# The medfusion image: Ray (the version pyproject.toml pins), CPU or CUDA PyTorch, DeepSpeed and this
# package. It is the image of the KFP steps, of the KubeRay head and workers, and of the RayJob
# submitters (k8s/ and medfusion.orchestration name it medfusion:<version> / medfusion-gpu:<version>).
#
#   docker build -t medfusion:0.1.0 .
#   docker build -t medfusion-gpu:0.1.0 \
#     --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 --build-arg DS_ACCELERATOR= .
#
# tests/k8s/test_dockerfile.py checks that the versions here are the pinned ones.
ARG RAY_VERSION=2.60.0
ARG BASE_IMAGE=rayproject/ray:${RAY_VERSION}-py311
FROM ${BASE_IMAGE}

ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# cpu: DeepSpeed never probes for CUDA (the CPU image); empty for the GPU image.
ARG DS_ACCELERATOR=cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0 \
    DS_ACCELERATOR=${DS_ACCELERATOR} \
    RAY_ENABLE_UV_RUN_RUNTIME_ENV=0

# The base image's unprivileged user (uid 1000, gid 100); nothing below runs as root.
USER 1000:100
WORKDIR /home/ray/medfusion

# 1. PyTorch first, from the CPU (or CUDA) index: a bare `torch` requirement would pull the
#    multi-GB default build. 2. DeepSpeed without build isolation (its setup imports torch), no ops
#    compiled at install time. 3. The package, which keeps the base image's Ray (same pinned version).
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install packaging psutil py-cpuinfo ninja numpy \
 && pip install --no-build-isolation deepspeed

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 platform ./platform
COPY --chown=1000:100 components ./components
COPY --chown=1000:100 pipelines ./pipelines
COPY --chown=1000:100 serve ./serve
RUN pip install . \
 && python -c "import ray, medfusion.serve.app, medfusion.orchestration; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# Ray's ports when this image runs a Ray node (KubeRay sets the command): GCS, dashboard and Jobs API,
# client, Serve.
EXPOSE 6379 8265 10001 8000
