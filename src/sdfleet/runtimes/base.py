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
    mask: bytes | None = None
    """An image-to-image task's inpainting mask (``params.extra["mask"]``, fetched)."""
    timeout_s: float | None = None


@dataclass
class RuntimeResult:
    images: list[bytes]
    """PNG bytes, one per image."""
    info: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    model: str | None = None
    switch_s: float = 0.0
    """Seconds of this run spent switching model (loading or activating a checkpoint); 0 when the
    job ran on the model that was already active."""
    download_s: float = 0.0
    """Seconds of this run spent bringing the model onto local disk (``models.s3`` on-demand fetch,
    or waiting for another agent's download of it); part of ``switch_s``' call, not counted in it."""
    run_s: float | None = None
    """Seconds the job held the device, when the runtime knows (in-process runtimes); the agent
    counts the rest of the call, beyond the switch, as waiting for the device (``runtime_wait``)."""


class Runtime(Protocol):
    name: str
    max_in_flight: int
    """How many ``run`` calls the agent may have outstanding at once: 1 for a runtime that owns the
    device in-process; 2 for a server with a queue of its own (SD WebUI, ComfyUI), so that the next
    job already waits there when one ends and the GPU does not idle between requests."""

    async def start(self) -> None:
        """Ready to serve: server reachable, default model loaded. Raises ``ModelLoadError``."""

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        """Run one job, switching model first if needed.

        Raises ``RuntimeFailure`` (retryable), ``Interrupted`` after ``interrupt()``,
        ``sdfleet.errors.Reject`` for a job that can never succeed (unknown model, bad input).
        """

    async def interrupt(self, task_id: str | None = None) -> None:
        """Stop the job of ``task_id``, queued or running, as soon as possible (between steps); its
        ``run`` raises ``Interrupted``. None: every job this runtime started. Never stops work that
        this runtime did not start (another client's job on a shared server)."""

    @property
    def loaded_model(self) -> str | None: ...

    async def aclose(self) -> None: ...
