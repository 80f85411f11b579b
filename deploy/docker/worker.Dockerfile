# syntax=docker/dockerfile:1.7
# sdfleet worker: the queue agent with the in-process diffusers runtime.
#
# One Python base for every image (the version CI tests). torch's PyPI wheels carry their own CUDA
# libraries (torch==2.13.0: CUDA 13), so no CUDA base image is needed; the node supplies only the
# NVIDIA driver, which must support CUDA 13.0: driver branch 580 or newer. NVIDIA_REQUIRE_CUDA
# makes the NVIDIA container runtime refuse to start the container on an older driver, with a
# clear error, instead of torch failing at the first CUDA call.
#   docker build -f deploy/docker/worker.Dockerfile -t sdfleet-worker:gpu .
# CPU variant: the CPU wheel index.
#   docker build -f deploy/docker/worker.Dockerfile -t sdfleet-worker:cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# The pip steps are CI's (Makefile `install`: the versions of requirements/lock.txt, torch from
# requirements/torch.txt), minus the dev extra; tests/deploy checks they agree.
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

FROM base AS build
ARG TORCH_INDEX_URL=""
WORKDIR /src
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY requirements ./requirements
RUN python -m pip install --no-cache-dir -c requirements/lock.txt pip
# torch first and pinned (requirements/torch.txt, as in CI), so the extra below never resolves
# another build.
RUN python -m pip install --no-cache-dir -r requirements/torch.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
# Dependencies only (an empty package stands in for src): cached until pyproject.toml changes.
RUN mkdir -p src/sdfleet && touch src/sdfleet/__init__.py \
    && python -m pip install --no-cache-dir -c requirements/lock.txt '.[diffusers,aws,redis]'
COPY src ./src
RUN python -m pip install --no-cache-dir --no-deps --force-reinstall .

FROM base
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/sdfleet sdfleet \
    && mkdir -p /models /run/sdfleet && chown 10001:10001 /models /run/sdfleet
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/sdfleet/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_VERBOSITY=error \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"
USER 10001:10001
WORKDIR /home/sdfleet
ENTRYPOINT ["sdfleet"]
CMD ["agent", "--help"]
