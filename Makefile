# The two set-up commands of the README: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sdfleet-installed

.PHONY: demo test lint install system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel first, pinned: a bare `torch` requirement would pull a CUDA build of several GB.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[diffusers,aws,redis,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/sdfleet demo

# redis-server comes from Debian; moto_server from the dev extra. The tests start both themselves
# on 127.0.0.1 with free ports and stop them by PID. The gallery tests drive Debian's chromium
# through Playwright (Playwright's own browser download is not used).
system-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
	@command -v redis-server >/dev/null && (systemctl disable --now redis-server >/dev/null 2>&1 || true)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: install system-deps lint
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

clean:
	rm -rf $(VENV) sdfleet-demo
