"""The a1111 runtime's requests in flight at SD WebUI, and which of them SD WebUI is running.

SD WebUI runs generation requests one at a time behind its queue lock, in arrival order. Its API
(with ``--nowebui``) does not say which request runs: ``/sdapi/v1/progress`` reports one job
state (its kind, ``job_timestamp`` to the second, steps) and drops the task id that
``force_task_id`` sets; ``/internal/progress``, which has it, exists only with the web UI. So the
runtime keeps its requests in the order it sent them and takes the oldest to be the one running,
with two checks against another client's job: the running job must be of the oldest request's
kind, and must not be a job SD WebUI was already running (or had queued ahead) when that request
was sent. A job is recognised by its ``job_timestamp`` (to the second); the timestamps of our own
requests that were in flight ahead of it, which SD WebUI reports in their ``info``, are not held
against it. Those of our jobs that had ended before it was sent are: another client's job may
have begun within the same second, and must never be taken for ours.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from sdfleet.runtimes.base import ProgressFn
from sdfleet.tasks import TaskType

# SD WebUI's ``state.job`` while each kind of request runs.
JOB_NAMES = {
    TaskType.TEXT_TO_IMAGE: "scripts_txt2img",
    TaskType.IMAGE_TO_IMAGE: "scripts_img2img",
    TaskType.EXTRA_SINGLE_IMAGE: "extras",
    TaskType.EXTRA_BATCH_IMAGES: "extras",
}


@dataclass(frozen=True)
class Snapshot:
    """One answer of ``/sdapi/v1/progress``."""

    active: bool
    job: str
    timestamp: str
    interrupted: bool
    progress: float

    @classmethod
    def parse(cls, data: Any) -> Snapshot | None:
        """None where the answer says nothing of SD WebUI's job state (a server without it)."""
        if not isinstance(data, dict) or not isinstance(data.get("state"), dict):
            return None
        state = data["state"]
        if "job_count" not in state:
            return None
        try:
            return cls(
                active=int(state.get("job_count") or 0) != 0,
                job=str(state.get("job") or ""),
                timestamp=str(state.get("job_timestamp") or ""),
                interrupted=bool(state.get("interrupted")),
                progress=float(data.get("progress") or 0.0),
            )
        except (TypeError, ValueError):
            return None


@dataclass(eq=False)
class Flight:
    """One ``run()``: waiting to be sent, then in flight at SD WebUI until its answer arrives."""

    task_id: str
    kind: TaskType
    progress: ProgressFn
    sent: bool = False
    cancelled: bool = False
    """``interrupt()`` asked for it: its answer, whatever it is, raises ``Interrupted``."""
    interrupt_sent: bool = False
    not_mine: set[str] = field(default_factory=set)
    """Job timestamps SD WebUI was running when this request was sent: not this request's job."""
    seen: set[str] = field(default_factory=set)
    """Job timestamps attributed to this request (and its answer's)."""
    ahead: list[Flight] = field(default_factory=list)
    """Our requests SD WebUI had when this one was sent: they run before it."""
    excused: set[str] = field(default_factory=set)
    """Job timestamps of those requests, once answered: ours, not another client's."""
    reported: float = 0.0
    hit: bool = False
    """SD WebUI's interrupt flag was up while it ran this job, which nobody here asked for (another
    client's interrupt, or ours for the job before that landed after it ended): its images are
    half-made."""
    answer: asyncio.Task[Any] | None = None
    """The request, once sent."""
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def cancel(self) -> None:
        self.cancelled = True
        self.stopped.set()

    @property
    def interruptible(self) -> bool:
        """Extras take milliseconds and SD WebUI stops them only between images: let them end."""
        return self.kind in (TaskType.TEXT_TO_IMAGE, TaskType.IMAGE_TO_IMAGE)


class Flights:
    """Our requests, oldest first: those waiting to be sent, and those SD WebUI has."""

    def __init__(self) -> None:
        self.waiting: list[Flight] = []
        self.sent: list[Flight] = []
        self._drained = asyncio.Event()
        self._drained.set()

    def all(self) -> list[Flight]:
        return [*self.sent, *self.waiting]

    def mark_sent(self, flight: Flight, snapshot: Snapshot | None) -> None:
        if snapshot is not None and snapshot.active:
            flight.not_mine.add(snapshot.timestamp)
        flight.ahead = list(self.sent)
        flight.sent = True
        self.waiting.remove(flight)
        self.sent.append(flight)
        self._drained.clear()

    def finish(self, flight: Flight, timestamp: str | None) -> None:
        """``flight``'s answer arrived (or it was dropped); remember its jobs as ours."""
        for collection in (self.waiting, self.sent):
            if flight in collection:
                collection.remove(flight)
        if timestamp:
            flight.seen.add(timestamp)
        for later in self.sent:  # done with: keep what the next ones may excuse, not the flight
            if flight in later.ahead:
                later.ahead.remove(flight)
                later.excused |= flight.seen
        if not self.sent:
            self._drained.set()

    async def drained(self) -> None:
        """Until SD WebUI has none of our requests."""
        await self._drained.wait()

    def running(self, snap: Snapshot) -> Flight | None:
        """Our request SD WebUI is running now, by the rules in the module docstring; else None."""
        head = self.sent[0] if self.sent else None
        if head is None or not snap.active or snap.job != JOB_NAMES.get(head.kind):
            return None
        if snap.timestamp in head.not_mine - head.excused - {t for f in head.ahead for t in f.seen}:
            return None
        head.seen.add(snap.timestamp)
        return head
