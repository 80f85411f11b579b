# syntax=docker/dockerfile:1.7
# sdfleet API: HTTP API only, no torch (also runs `sdfleet ensure`, the chart's hook Job).
#   docker build -f deploy/docker/api.Dockerfile -t sdfleet-api .
# The pip step is CI's (Makefile `install`) without torch and without the diffusers and dev extras;
# tests/deploy checks they agree. Dependencies install before src is copied, so a code change
# rebuilds one small layer; .dockerignore keeps the context to pyproject.toml, README.md,
# requirements/ (the lock: CI's versions) and src/.
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
# Dependencies only (an empty package stands in for src): cached until pyproject.toml changes.
RUN mkdir -p src/sdfleet && touch src/sdfleet/__init__.py \
    && python -m pip install --no-cache-dir -c requirements/lock.txt '.[aws,redis]'
COPY src ./src
RUN python -m pip install --no-cache-dir --no-deps --force-reinstall .

FROM base
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/sdfleet sdfleet
ENV PATH=/opt/venv/bin:$PATH
USER 10001:10001
WORKDIR /home/sdfleet
EXPOSE 8080 9090
ENTRYPOINT ["sdfleet"]
CMD ["api", "--host", "0.0.0.0", "--port", "8080"]
