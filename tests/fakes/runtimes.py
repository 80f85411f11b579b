"""Runtimes with one behaviour each, loaded by import path (``runtime: fakes.runtimes:AlwaysFails``)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdfleet.errors import InputUnavailable, RuntimeFailure
from sdfleet.models.catalog import ModelCatalog
from sdfleet.runtimes.base import Job, ProgressFn, RuntimeResult


class _Fake:
    """What every fake does the same way: one job at a time, nothing to start, stop or interrupt,
    no model; built from the fleet file with no options (a fake that reads some overrides
    ``from_options``)."""

    name = "fake"
    max_in_flight = 1

    @classmethod
    def from_options(
        cls, *, catalog: ModelCatalog, options: Mapping[str, Any], default_model: str | None, cache_size: int
    ) -> Any:
        return cls()

    async def start(self) -> None:
        return None

    async def interrupt(self, task_id: str | None = None) -> None:
        return None

    @property
    def loaded_model(self) -> str | None:
        return None

    async def aclose(self) -> None:
        return None


class AlwaysFails(_Fake):
    """Every run fails like a crashed WebUI would: the agent must retry, then dead-letter."""

    name = "always-fails"

    def __init__(self, message: str = "the GPU caught fire", *, input_unavailable: bool = False) -> None:
        self.message = message
        self.input_unavailable = input_unavailable
        """Fail as a runtime does whose own input fetch (a URL inside the job) was told "not now"."""
        self.runs = 0

    @classmethod
    def from_options(
        cls, *, catalog: ModelCatalog, options: Mapping[str, Any], default_model: str | None, cache_size: int
    ) -> AlwaysFails:
        message = str(options.get("message", "the GPU caught fire"))
        return cls(message, input_unavailable=bool(options.get("input_unavailable", False)))

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        self.runs += 1
        await progress(0.5)
        if self.input_unavailable:
            raise InputUnavailable(self.message)
        raise RuntimeFailure(self.message)


class MixedMedia(_Fake):
    """Returns what ComfyUI's animation and video nodes make: a PNG, a GIF, a WebP and an MP4."""

    name = "mixed-media"

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        return RuntimeResult(images=media_samples(), info={"runtime": self.name})


def media_samples() -> list[bytes]:
    import io

    from PIL import Image

    out = []
    for fmt in ("PNG", "GIF", "WEBP"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format=fmt)
        out.append(buf.getvalue())
    # the first box of an MP4 file: size, "ftyp", major brand "isom"
    out.append(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(64))
    return out


class FailsUntilFixed(_Fake):
    """Fails every run like ``AlwaysFails`` while ``broken``; a test sets it to False (the fix
    deployed) and from then on each run makes one PNG."""

    name = "fails-until-fixed"

    def __init__(self) -> None:
        self.broken = True
        self.runs = 0

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        self.runs += 1
        if self.broken:
            raise RuntimeFailure("out of memory: the model does not fit")
        return RuntimeResult(images=media_samples()[:1], info={"runtime": self.name})


class KillsItsAgent(_Fake):
    """Takes its own process down on each run while the file ``options.kill_while`` exists, as a
    runtime killed for memory or crashing in native code does; once the file is gone (the fix
    deployed) each run makes one PNG."""

    name = "kills-its-agent"

    def __init__(self, kill_while: Path) -> None:
        self.kill_while = kill_while

    @classmethod
    def from_options(
        cls, *, catalog: ModelCatalog, options: Mapping[str, Any], default_model: str | None, cache_size: int
    ) -> KillsItsAgent:
        return cls(Path(str(options["kill_while"])))

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        if self.kill_while.exists():
            await asyncio.sleep(0.5)  # partway through, as memory runs out: its start is recorded
            os.kill(os.getpid(), signal.SIGKILL)
        return RuntimeResult(images=media_samples()[:1], info={"runtime": self.name})
