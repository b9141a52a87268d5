# syntax=docker/dockerfile:1
# investment-risk: one CUDA image for training, export and scoring.
# CUDA comes from PyPI wheels only: torch 2.15 and onnxruntime-gpu 1.31 both target CUDA 13 and share the one set
# of nvidia-* libraries in docker/requirements.lock. The NVIDIA driver comes from the node (container toolkit).
# checkov:skip=CKV_DOCKER_2: a batch Job image has no long-running service to probe; Kubernetes tracks the Job's exit code

FROM python:3.12.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first (hash-checked, from the committed lock), so code edits do not rebuild this layer.
COPY docker/requirements.lock ./
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/venv/bin/pip install --no-deps . \
    && /opt/venv/bin/investment-risk --help > /dev/null

FROM python:3.12.11-slim-bookworm
LABEL org.opencontainers.image.title="investment-risk" \
      org.opencontainers.image.description="Financial news to eight calibrated risk scores"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    INVESTMENT_RISK_CACHE=/cache/investment-risk \
    MPLCONFIGDIR=/tmp/matplotlib \
    INVESTMENT_RISK_LOG_FORMAT=json
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app \
    && mkdir -p /cache /work \
    && chown 10001:10001 /cache /work
COPY --from=build /opt/venv /opt/venv
# Writable caches live on a mount (/cache: an emptyDir or PVC); the root filesystem can stay read-only.
VOLUME ["/cache"]
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["investment-risk"]
CMD ["--help"]
