# The two set-up commands of the README: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sdfleet-installed

.PHONY: demo test test-slow lint install lock lock-check system-deps clean

# requirements/lock.txt pins every package CI tested, pip and setuptools included; torch stays out of it
# (requirements/torch.txt: pip takes the CPU build from the machine's local wheel, never a CUDA one).
LOCK := requirements/lock.txt
TORCH := requirements/torch.txt
COMPILE = $(BIN)/pip-compile --quiet --extra diffusers,aws,redis,simulate,dev --strip-extras --annotation-style line \
	--unsafe-package torch --no-emit-index-url --no-emit-find-links -c $(TORCH)

$(STAMP): pyproject.toml $(LOCK) $(TORCH)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) pip
	$(BIN)/python -m pip install -q -r $(TORCH) -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	# spandrel (model upscalers) without its torchvision: PyPI has only CUDA torchvision builds, which
	# would replace the CPU torch; sdfleet imports spandrel without torchvision (pyproject: upscalers).
	$(BIN)/python -m pip install -q --no-deps 'spandrel==0.4.2' 'einops==0.8.2'
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/sdfleet demo

# redis-server and prometheus come from Debian; moto_server from the dev extra. The tests start
# them themselves on 127.0.0.1 with free ports and stop them by PID: no system service runs. The
# gallery tests drive Debian's chromium through Playwright (Playwright's own browser download is
# not used).
system-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
	@command -v redis-server >/dev/null && (systemctl disable --now redis-server >/dev/null 2>&1 || true)
	@command -v prometheus >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@command -v prometheus >/dev/null && (systemctl disable --now prometheus >/dev/null 2>&1 || true)

lint: install
	$(BIN)/ruff check src tests bench deploy
	$(BIN)/ruff format --check src tests bench deploy
	$(BIN)/mypy

# Four workers on two cores: most tests wait on subprocesses and sockets, not the CPU (three kept
# the cores 60 % busy). worksteal: a worker left with a long tail hands tests to idle ones.
test: install system-deps lint
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -n 4 --dist worksteal

# The long interop, fuzzing and bench runs the default suite leaves out (tests/conftest.py SLOW).
test-slow: install system-deps
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m slow

# After a change to pyproject.toml's dependencies: re-resolve, keeping every pin that still fits
# (`make lock UPGRADE=1` moves everything to the newest releases). Commit the result.
lock: install
	$(COMPILE) $(if $(UPGRADE),--upgrade) -o $(LOCK) pyproject.toml

# pip-compile itself confirms the lock: resolving again from pyproject.toml changes nothing.
lock-check: install
	@tmp=$$(mktemp -d) && cp $(LOCK) $$tmp/lock.txt && $(COMPILE) -o $$tmp/lock.txt pyproject.toml \
	  && diff <(grep -v '^#' $(LOCK)) <(grep -v '^#' $$tmp/lock.txt) && rm -r $$tmp && echo "$(LOCK) matches pyproject.toml"

clean:
	rm -rf $(VENV) sdfleet-demo
