"""What the A1111-compatible server keeps between requests: runtime, options, checkpoints, progress."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdfleet.errors import NotFound, Reject
from sdfleet.models.catalog import ModelCatalog, ModelInfo
from sdfleet.runtimes.base import Job, Runtime, RuntimeResult
from sdfleet.tasks import TaskParams, TaskType

_CHUNK = 1 << 20


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_sha256(path: Path) -> str:
    """A diffusers folder has no single file to hash: hash its index and the listing of its files."""
    digest = hashlib.sha256((path / "model_index.json").read_bytes())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path)}\0{f.stat().st_size}\n".encode())
    return digest.hexdigest()


@dataclass
class Checkpoints:
    """SD WebUI's view of the models: titles ``"<name> [<short hash>]"``, hashes cached per file state."""

    catalog: ModelCatalog
    _hashes: dict[tuple[str, int, float], str] = field(default_factory=dict)

    def sha256(self, info: ModelInfo) -> str:
        stat = info.path.stat()
        key = (str(info.path), stat.st_size, stat.st_mtime)
        if key not in self._hashes:
            hasher = _folder_sha256 if info.kind == "diffusers" else _file_sha256
            self._hashes[key] = hasher(info.path)
        return self._hashes[key]

    def title(self, info: ModelInfo) -> str:
        return f"{info.name} [{self.sha256(info)[:10]}]"

    def items(self) -> list[dict[str, Any]]:
        """Blocking (hashes files the first time): call in a thread."""
        out = []
        for info in self.catalog.list():
            sha = self.sha256(info)
            out.append(
                {
                    "title": f"{info.name} [{sha[:10]}]",
                    "model_name": info.stem,
                    "hash": sha[:10],
                    "sha256": sha,
                    "filename": str(info.path.resolve()),
                    "config": str(info.config) if info.config else None,
                }
            )
        return out

    def resolve(self, name: str) -> ModelInfo:
        """A checkpoint by title, file name or stem; ``Reject`` when there is none."""
        try:
            return self.catalog.resolve(name)
        except NotFound as e:
            raise Reject(f"model {name!r} not found", code="unknown_model") from e


@dataclass
class ServerState:
    runtime: Runtime
    checkpoints: Checkpoints
    options: dict[str, Any] = field(default_factory=lambda: {"CLIP_stop_at_last_layers": 1})
    selected: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    job: str = ""
    job_no: int = 0
    job_timestamp: str = "0"
    fraction: float = 0.0
    sampling_steps: int = 0
    started_at: float | None = None
    interrupted: bool = False

    async def load(self, name: str) -> str:
        """Make ``name`` the loaded checkpoint (the runtime loads it now); its catalog name."""
        info = self.checkpoints.resolve(name)
        async with self.lock:
            # A runtime loads its default model in start(): the only switch the protocol offers.
            self.runtime.default_model = info.name  # type: ignore[attr-defined]
            await self.runtime.start()
            self.selected = info.name
        return info.name

    def current_title(self) -> str | None:
        name = self.runtime.loaded_model or self.selected
        if name is None:
            return None
        try:
            return self.checkpoints.title(self.checkpoints.resolve(name))
        except (Reject, OSError):
            return name

    async def run(self, kind: TaskType, params: TaskParams, images: list[bytes]) -> RuntimeResult:
        """One generation at a time, as SD WebUI's queue lock does; progress is recorded for /progress."""
        clip = self.options.get("CLIP_stop_at_last_layers")
        if params.clip_skip == 1 and isinstance(clip, int) and 1 < clip <= 12:
            params = params.model_copy(update={"clip_skip": clip})
        async with self.lock:
            self._begin(kind, params.steps)
            try:
                job = Job(f"sdapi-{self.job_no}", kind, self.selected, params, init_images=images)
                return await self.runtime.run(job, self._progress)
            finally:
                self._end()

    async def interrupt(self) -> None:
        if self.job:
            self.interrupted = True
            await self.runtime.interrupt(f"sdapi-{self.job_no}")

    async def _progress(self, fraction: float) -> None:
        self.fraction = fraction

    def _begin(self, kind: TaskType, steps: int) -> None:
        self.job_no += 1
        self.job = f"{kind.value} {self.job_no}"
        self.job_timestamp = time.strftime("%Y%m%d%H%M%S")
        self.fraction = 0.0
        self.sampling_steps = steps
        self.started_at = time.monotonic()
        self.interrupted = False

    def _end(self) -> None:
        self.job = ""
        self.started_at = None
        self.fraction = 0.0

    def progress(self) -> dict[str, Any]:
        eta = 0.0
        if self.started_at is not None and self.fraction > 0:
            elapsed = time.monotonic() - self.started_at
            eta = elapsed / self.fraction - elapsed
        return {
            "progress": self.fraction,
            "eta_relative": eta,
            "state": {
                "skipped": False,
                "interrupted": self.interrupted,
                "stopping_generation": False,
                "job": self.job,
                "job_count": 1 if self.job else 0,
                "job_timestamp": self.job_timestamp,
                "job_no": self.job_no if self.job else 0,
                "sampling_step": round(self.fraction * self.sampling_steps),
                "sampling_steps": self.sampling_steps,
            },
            "current_image": None,
            "textinfo": None,
        }
