"""Runtimes turn a ``Job`` into images: in-process diffusers, SD WebUI, ComfyUI, synthetic."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sdfleet.tasks import TaskParams, TaskType

ProgressFn = Callable[[float], Awaitable[None]]
"""Called with 0..1 as work advances; cheap, may be throttled by the caller."""


@dataclass
class Job:
    """One unit of work for a runtime: inputs already fetched and decoded to bytes."""

    task_id: str
    type: TaskType
    model: str | None
    params: TaskParams
    init_images: list[bytes] = field(default_factory=list)
    timeout_s: float | None = None


@dataclass
class RuntimeResult:
    images: list[bytes]
    """PNG bytes, one per image."""
    info: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    model: str | None = None
    switch_s: float = 0.0
    """Seconds of this run spent switching model (loading or activating a checkpoint)."""


class Runtime(Protocol):
    name: str

    async def start(self) -> None:
        """Ready to serve: server reachable, default model loaded. Raises ``ModelLoadError``."""

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        """Run one job, switching model first if needed.

        Raises ``RuntimeFailure`` (retryable), ``Interrupted`` after ``interrupt()``,
        ``sdfleet.errors.Reject`` for a job that can never succeed (unknown model, bad input).
        """

    async def interrupt(self) -> None:
        """Stop the job in progress as soon as possible (between steps)."""

    @property
    def loaded_model(self) -> str | None: ...

    async def aclose(self) -> None: ...
