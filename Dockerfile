# investment-risk: one CUDA image for training, export and scoring.
# CUDA comes from PyPI wheels only: torch and onnxruntime-gpu both target CUDA 13 and share the one set of nvidia-*
# libraries in docker/requirements.lock. The NVIDIA driver comes from the node (container toolkit).
# The base is Debian's slim image; where no registry can be reached, docker/base-image.sh builds the same name from
# Debian's packages (debootstrap), so this file builds unchanged on both. Python is Debian's (3.13 in trixie).
# Behind a TLS-intercepting proxy pass its CA bundle as a BuildKit secret (`make image` does, from IMAGE_CA_BUNDLE):
#   DOCKER_BUILDKIT=1 docker build --secret id=ca,src=/path/to/ca.crt .
# It is mounted only for the RUN steps that download; no layer keeps it.
# checkov:skip=CKV_DOCKER_2: a batch Job image has no long-running service to probe; Kubernetes tracks the Job's exit code
FROM debian:trixie-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then printf 'Acquire::https::CAInfo "/run/secrets/ca";\n' > /etc/apt/apt.conf.d/99ca; fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* /etc/apt/apt.conf.d/99ca
WORKDIR /src
# Dependencies first (hash-checked, from the committed lock), so code edits do not rebuild this layer.
COPY docker/requirements.lock ./
RUN --mount=type=secret,id=ca,required=false \
    python3 -m venv /opt/venv \
    && if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY src ./src
# The project itself builds with the lock's setuptools: no second download, nothing unpinned.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
    && /opt/venv/bin/investment-risk --help > /dev/null \
    && /opt/venv/bin/pip uninstall -y pip \
    && find /opt/venv -path '*/site-packages/*/tests' -prune -exec rm -rf {} +

FROM debian:trixie-slim
LABEL org.opencontainers.image.title="investment-risk" \
      org.opencontainers.image.description="Financial news to eight calibrated risk scores"
# Every writable path points under /tmp (a tmpfs) or /cache (a volume): the root filesystem stays read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/cache/huggingface \
    INVESTMENT_RISK_CACHE=/cache/investment-risk \
    MPLCONFIGDIR=/tmp/matplotlib \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    CUDA_CACHE_PATH=/cache/nv \
    ORT_DISABLE_TELEMETRY=1 \
    INVESTMENT_RISK_LOG_FORMAT=json
# The interpreter, the OpenMP runtime torch's CPU kernels link, and what `train --compile` builds its kernels with:
# a C/C++ compiler and Python's headers (Triton compiles its CUDA driver stub with them, Inductor its CPU kernels,
# after checksumming its precompiled header with the openssl command). The CA bundle: the stage Job's download from
# the hub verifies TLS against the system's store alone (httpx's ssl context; no certifi fallback).
# No pip, make, git or apt lists.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then printf 'Acquire::https::CAInfo "/run/secrets/ca";\n' > /etc/apt/apt.conf.d/99ca; fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 g++ python3-dev openssl ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log /etc/apt/apt.conf.d/99ca \
    && groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app \
    && mkdir -p /cache \
    && chown 10001:10001 /cache
COPY --from=build /opt/venv /opt/venv
VOLUME ["/cache"]
# The working directory is the writable /tmp: a relative path (`demo`'s default demo-output) lands there, not on the
# read-only root.
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["investment-risk"]
CMD ["--help"]
