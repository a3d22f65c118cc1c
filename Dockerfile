# The medfusion image: Ray (the version pyproject.toml pins), CPU or CUDA PyTorch, DeepSpeed and this
# package, every Python package at the version constraints/image.txt pins. It is the image of the KFP
# steps, of the KubeRay head and workers, and of the RayJob submitters (k8s/ and
# medfusion.orchestration name it medfusion:<version> / medfusion-gpu:<version>).
#
#   docker build -t medfusion:0.1.0 .
#   docker build -t medfusion-gpu:0.1.0 \
#     --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 --build-arg DS_ACCELERATOR=cuda .
#
# Push both to your registry and pin them by digest in your overlay (k8s/overlays/prod, README).
# tests/k8s/test_dockerfile.py and tests/k8s/test_image_build.py check the versions and the build args.
ARG RAY_VERSION=2.60.0
ARG BASE_IMAGE=rayproject/ray:${RAY_VERSION}-py311
FROM ${BASE_IMAGE}

ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# DeepSpeed's accelerator, fixed at build time: cpu (never probes for CUDA) or cuda (the GPU image).
# DeepSpeed rejects anything else, the empty string included, at install and at run time.
ARG DS_ACCELERATOR=cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0 \
    DS_ACCELERATOR=${DS_ACCELERATOR} \
    RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
# Serve's HTTP proxies answer 408 to a client whose request headers do not arrive within
# MEDFUSION_HEADER_TIMEOUT_S (default 10 s) instead of holding its connection open.
ENV RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=medfusion.serve.app:proxy_callback
# Serve's throughput mode without its direct ingress or log buffer (medfusion.serving.settings.THROUGHPUT_ENV says why).
ENV RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
    RAY_SERVE_ENABLE_DIRECT_INGRESS=0 \
    RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1

# The base image's unprivileged user (uid 1000, gid 100); nothing below runs as root.
USER 1000:100
WORKDIR /home/ray/medfusion

# Fail the build at once, not at the first `import deepspeed` in a pod.
RUN case "${DS_ACCELERATOR}" in cpu|cuda) ;; *) echo "DS_ACCELERATOR must be cpu or cuda, got '${DS_ACCELERATOR}'" >&2; exit 1;; esac

# Every pip install below is held to these pins (-c): the same versions in every build.
COPY --chown=1000:100 constraints/image.txt ./constraints/image.txt

# 1. PyTorch first, the wheel alone from the CPU (or CUDA) index (a bare `torch` requirement would
#    pull the multi-GB default build), then its dependencies from PyPI at the pinned versions.
# 2. DeepSpeed without build isolation (its setup imports torch), no ops compiled at install time.
# 3. The package, which keeps the base image's Ray (same pinned version).
RUN pip install -c constraints/image.txt --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install -c constraints/image.txt "torch==${TORCH_VERSION}" \
 && pip install -c constraints/image.txt packaging psutil py-cpuinfo ninja numpy \
 && pip install -c constraints/image.txt --no-build-isolation deepspeed

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 platform ./platform
COPY --chown=1000:100 components ./components
COPY --chown=1000:100 pipelines ./pipelines
COPY --chown=1000:100 serve ./serve
RUN pip install -c constraints/image.txt . \
 && python -c "import ray, medfusion.serve.app, medfusion.orchestration; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# Ray's ports when this image runs a Ray node (KubeRay sets the command): GCS, dashboard and Jobs API,
# client, Serve, metrics.
EXPOSE 6379 8265 10001 8000 8080
