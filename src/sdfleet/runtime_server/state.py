"""What the A1111-compatible server keeps between requests: the runtime, its queue, the loaded
checkpoint, the settings, and SD WebUI's job state that ``/sdapi/v1/progress`` reports.

One job runs at a time, in arrival order, as behind SD WebUI's ``queue_lock``. ``/interrupt``
stops the job running at that moment; a job that starts afterwards is not affected (SD WebUI
clears its interrupt flag when a job begins).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from sdfleet.models.catalog import HOW_TO_ADD, folder_named
from sdfleet.runtime_server.checkpoints import Checkpoints
from sdfleet.runtime_server.errors import refused
from sdfleet.runtime_server.options import Options
from sdfleet.runtimes._styles import Styles
from sdfleet.runtimes.base import Job, Runtime, RuntimeResult
from sdfleet.tasks import TaskParams, TaskType

log = logging.getLogger(__name__)


class _Loads(Protocol):
    default_model: str | None


class _Unloads(Protocol):
    async def unload(self) -> None: ...


def _batch_label(job_no: int, job_count: int) -> str:
    """``state.job`` while iteration ``job_no`` of an ``n_iter`` > 1 job runs, in SD WebUI's words."""
    return f"Batch {job_no + 1} out of {job_count}"


@dataclass
class JobState:
    """SD WebUI's ``shared.state``, as ``/progress`` reports it."""

    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    time_start: float = 0.0

    def begin(self, job: str, job_count: int, sampling_steps: int) -> None:
        # In SD WebUI's order (shared_state.State.begin): the count first, the job's name last, so
        # a /progress read in between sees a job starting (count set, no name) with the previous
        # timestamp, never a named job with another job's timestamp.
        self.skipped = self.interrupted = self.stopping_generation = False
        self.sampling_step, self.sampling_steps = 0, sampling_steps
        self.time_start = time.time()
        self.job_count, self.job_no = job_count, 0
        self.job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        self.job = job if job_count <= 1 else _batch_label(0, job_count)

    def advance(self, fraction: float) -> None:
        """A runtime fraction over the whole job → SD WebUI's iteration and step counters."""
        done = min(max(fraction, 0.0), 1.0) * self.job_count
        job_no = min(self.job_count - 1, int(done))
        if job_no != self.job_no:  # SD WebUI's next iteration: a skip was for the previous one
            self.job, self.skipped = _batch_label(job_no, self.job_count), False
        self.job_no = job_no
        self.sampling_step = min(self.sampling_steps, round((done - self.job_no) * self.sampling_steps))

    def end(self, iterations: int) -> None:
        # SD WebUI moves to the next iteration (step 0) after each one; the step count stays.
        self.job, self.job_count, self.job_no, self.sampling_step = "", 0, iterations, 0
        self.skipped = False

    def snapshot(self) -> dict[str, Any]:
        keys = ("skipped", "interrupted", "stopping_generation", "job", "job_count", "job_timestamp")
        out = {k: getattr(self, k) for k in keys}
        out.update(job_no=self.job_no, sampling_step=self.sampling_step, sampling_steps=self.sampling_steps)
        return out

    def progress(self) -> dict[str, Any]:
        """``/progress``'s numbers, by SD WebUI's formula (0.01 as soon as a job runs)."""
        if self.job_count == 0:
            return {"progress": 0.0, "eta_relative": 0.0}
        value = 0.01 + self.job_no / self.job_count
        if self.sampling_steps > 0:
            value += self.sampling_step / self.sampling_steps / self.job_count
        elapsed = time.time() - self.time_start
        return {"progress": min(value, 1.0), "eta_relative": elapsed / value - elapsed}


class ServerState:
    """The runtime behind the API and everything requests share."""

    def __init__(self, runtime: Runtime, checkpoints: Checkpoints) -> None:
        self.runtime = runtime
        self.checkpoints = checkpoints
        self.styles = Styles(checkpoints.catalog.models_dir)
        """The models folder's ``styles.csv``: SD WebUI's saved prompt styles."""
        self.options = Options()
        self.selected: str | None = None
        """Catalog name of the loaded checkpoint (``sd_model_checkpoint``)."""
        self.queue = asyncio.Lock()
        self.state = JobState()
        self._running: str | None = None
        self._jobs = 0

    async def load(self, name: str) -> str:
        """Make ``name`` the loaded checkpoint, after the queued jobs; its catalog name."""
        info = self.checkpoints.resolve(name)
        async with self.queue:
            await self._load_now(info.name)
        return info.name

    async def _load_now(self, name: str) -> None:
        # start() loads the runtime's default model: the only switch the Runtime protocol offers.
        loads: _Loads = self.runtime  # type: ignore[assignment]
        loads.default_model = name
        await self.runtime.start()
        self.selected = name
        await asyncio.to_thread(self.checkpoints.hash, self.checkpoints.resolve(name))

    async def unload(self) -> None:
        """Free the loaded checkpoint's memory, after the queued jobs; ``selected`` stays, and the
        next job (or ``reload``) loads it again."""
        unloads: _Unloads = self.runtime  # type: ignore[assignment]
        async with self.queue:
            await unloads.unload()

    async def reload(self) -> None:
        """Load the selected checkpoint again (after ``unload``), after the queued jobs."""
        if self.selected is not None:
            await self.load(self.selected)

    async def start(self, configured: str | None) -> None:
        """Load the configured checkpoint, else the first of the folder (as SD WebUI starts)."""
        loads: _Loads = self.runtime  # type: ignore[assignment]
        name = configured or getattr(loads, "default_model", None)
        if name is None:
            first = self.checkpoints.first()
            name = first.name if first is not None else None
        if name is None:
            log.warning(
                "no model in %s: the server starts with no checkpoint (%s)",
                folder_named(self.checkpoints.catalog.models_dir),
                HOW_TO_ADD,
            )
            return
        await self._load_now(self.checkpoints.resolve(name).name)

    def loaded(self) -> tuple[str | None, str | None]:
        """(title, full sha256) of the loaded checkpoint, or (None, None)."""
        if self.selected is None:
            return None, None
        try:
            info = self.checkpoints.resolve(self.selected)
        except Exception:
            return self.selected, None
        return self.checkpoints.title(info), self.checkpoints.known_hash(info)

    async def run(
        self,
        kind: TaskType,
        params: TaskParams,
        images: list[bytes],
        *,
        model: str | None,
        job: str,
        iterations: int,
        mask: bytes | None = None,
    ) -> RuntimeResult:
        """One generation behind the queue; progress is recorded for ``/progress``."""
        if model is None and self.selected is None:
            raise refused(422, "no checkpoint is loaded: put a model in the models folder, or POST /options")
        async with self.queue:
            self._jobs += 1
            task_id = f"sdapi-{self._jobs}"
            self.state.begin(job, iterations, self.sampling_steps(kind, params))
            self._running = task_id
            try:
                work = Job(task_id, kind, model or self.selected, params, init_images=images, mask=mask)
                return await self.runtime.run(work, self._progress)
            finally:
                self._running = None
                self.state.end(self.state.job_no + 1)

    @contextlib.asynccontextmanager
    async def exclusive(self, job: str, count: int) -> AsyncIterator[JobState]:
        """The queue, for work this server does itself (extras), with SD WebUI's job state."""
        async with self.queue:
            self.state.begin(job, count, 0)
            try:
                yield self.state
            finally:
                self.state.end(self.state.job_no)

    @staticmethod
    def sampling_steps(kind: TaskType, params: TaskParams) -> int:
        if kind is TaskType.IMAGE_TO_IMAGE:  # SD WebUI denoises int(strength × steps) + 1 steps
            return int(min(params.denoising_strength, 0.999) * params.steps) + 1
        return params.steps

    async def interrupt(self) -> None:
        """Stop what runs now, as SD WebUI's ``/interrupt`` does."""
        self.state.interrupted = True
        if self._running is not None:
            await self.runtime.interrupt(self._running)

    async def _progress(self, fraction: float) -> None:
        self.state.advance(fraction)
