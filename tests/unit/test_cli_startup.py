"""What a command pays before it runs: ``import sdfleet.cli`` (every ``sdfleet`` command, and each
Tab of shell completion, which runs the program) loads none of the heavy libraries a command
imports when it needs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# the HTTP client (httpx), the tracing SDK (which loads psutil), the engines' clients, the web
# framework and the diffusion stack
LAZY = ("httpx", "opentelemetry.sdk", "psutil", "boto3", "redis", "fastapi", "torch", "diffusers")


def test_the_cli_module_imports_no_heavy_library() -> None:
    code = "import json, sys, sdfleet.cli; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout)
    heavy = [m for m in loaded if any(m == lib or m.startswith(lib + ".") for lib in LAZY)]
    assert heavy == []


def test_the_package_still_exports_its_names() -> None:
    import sdfleet
    from sdfleet.client import AsyncClient
    from sdfleet.tasks import TaskState

    assert sdfleet.AsyncClient is AsyncClient and sdfleet.TaskState is TaskState
    assert set(sdfleet.__all__) == {*sdfleet._HOME, "__version__"}  # the two lists agree
    assert all(hasattr(sdfleet, name) for name in sdfleet.__all__)
    with pytest.raises(AttributeError, match="'Nothing'"):
        sdfleet.Nothing  # noqa: B018
