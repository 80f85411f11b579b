# syntax=docker/dockerfile:1.7
# sdfleet agent: the queue agent without torch, the side-car of an SD WebUI (a1111) or ComfyUI
# container in the same pod (it talks to the runtime on 127.0.0.1).
#   docker build -f deploy/docker/agent.Dockerfile -t sdfleet-agent .
# The pip step is CI's (Makefile `install`) without torch and without the diffusers and dev extras;
# tests/deploy checks they agree. Dependencies install before src is copied (see api.Dockerfile).
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

FROM base AS build
WORKDIR /src
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY requirements ./requirements
RUN python -m pip install --no-cache-dir -c requirements/lock.txt pip
RUN mkdir -p src/sdfleet && touch src/sdfleet/__init__.py \
    && python -m pip install --no-cache-dir -c requirements/lock.txt '.[aws,redis]'
COPY src ./src
RUN python -m pip install --no-cache-dir --no-deps --force-reinstall .

FROM base
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/sdfleet sdfleet \
    && mkdir -p /run/sdfleet && chown 10001:10001 /run/sdfleet
ENV PATH=/opt/venv/bin:$PATH
USER 10001:10001
WORKDIR /home/sdfleet
ENTRYPOINT ["sdfleet"]
CMD ["agent", "--help"]
