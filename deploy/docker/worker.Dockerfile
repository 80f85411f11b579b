# syntax=docker/dockerfile:1.7
# sdfleet worker: the queue agent with the in-process diffusers runtime.
#
# GPU (default): CUDA base, torch's default (CUDA) wheel from PyPI.
#   docker build -f deploy/docker/worker.Dockerfile -t sdfleet-worker:gpu .
# CPU variant: a slim Python base and the CPU wheel index.
#   docker build -f deploy/docker/worker.Dockerfile -t sdfleet-worker:cpu \
#     --build-arg BASE_IMAGE=python:3.11.13-slim-bookworm \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# The pip steps are CI's (Makefile `install`), minus the dev extra; tests/deploy checks they agree.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The CUDA bases ship no Python; the slim Python base does.
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi

FROM base AS build
ARG TORCH_INDEX_URL=""
WORKDIR /src
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN python -m pip install --no-cache-dir --upgrade pip
# torch first and pinned, as in CI, so the extra below never resolves another build.
RUN python -m pip install --no-cache-dir torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m pip install --no-cache-dir '.[diffusers,aws,redis]'

FROM base
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/sdfleet sdfleet \
    && mkdir -p /models /run/sdfleet && chown 10001:10001 /models /run/sdfleet
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/sdfleet/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_VERBOSITY=error
USER 10001:10001
WORKDIR /home/sdfleet
ENTRYPOINT ["sdfleet"]
CMD ["agent", "--help"]
