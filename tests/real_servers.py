"""Real SD WebUI and ComfyUI servers, named by ``SDFLEET_A1111_URL`` and ``SDFLEET_COMFYUI_URL``:
what the interop suite (the runtimes call by call) and the real-server e2e tests (the whole agent)
run against, and the marks that skip them when none is named (docs/runtimes.md says how to start
both offline on CPU)."""

from __future__ import annotations

import os

import httpx
import pytest

A1111_URL = os.environ.get("SDFLEET_A1111_URL", "").rstrip("/")
COMFYUI_URL = os.environ.get("SDFLEET_COMFYUI_URL", "").rstrip("/")

needs_a1111 = pytest.mark.skipif(
    not A1111_URL,
    reason="no real SD WebUI: set SDFLEET_A1111_URL=http://HOST:PORT of one started with --api "
    "(docs/runtimes.md: 'SD WebUI v1.10.1 on CPU, offline')",
)
needs_comfyui = pytest.mark.skipif(
    not COMFYUI_URL,
    reason="no real ComfyUI: set SDFLEET_COMFYUI_URL=http://HOST:PORT of one with an SD 1.5-shaped "
    "checkpoint (docs/runtimes.md, 'A real ComfyUI for the interop suite')",
)


def comfyui_checkpoint() -> str:
    """``SDFLEET_COMFYUI_CKPT``, else the first checkpoint the ComfyUI offers."""
    if os.environ.get("SDFLEET_COMFYUI_CKPT"):
        return os.environ["SDFLEET_COMFYUI_CKPT"]
    info = httpx.get(f"{COMFYUI_URL}/object_info/CheckpointLoaderSimple", timeout=30).json()
    names = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert names, "ComfyUI offers no checkpoint: put one in its models/checkpoints"
    return str(names[0])


async def a1111_checkpoint() -> str:
    """``SDFLEET_A1111_CKPT``, else the SD WebUI's current checkpoint (its title without the hash)."""
    if os.environ.get("SDFLEET_A1111_CKPT"):
        return os.environ["SDFLEET_A1111_CKPT"]
    async with httpx.AsyncClient(base_url=A1111_URL, timeout=60) as client:
        current = (await client.get("/sdapi/v1/options")).json()["sd_model_checkpoint"]
    return str(current).split(" [", 1)[0]
