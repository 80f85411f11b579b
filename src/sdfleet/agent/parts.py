"""What an agent works with (``Parts``) and a task on its way through it (``Prepared``)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from sdfleet.agent.handle import DeliveryHandle
from sdfleet.bus.base import Bus, Delivery
from sdfleet.bus.restore import TopologyKeeper
from sdfleet.guarded_http import InputFetcher
from sdfleet.media import sniff
from sdfleet.notify.base import Notifier
from sdfleet.runtimes.base import Job, Runtime
from sdfleet.settings import AgentSettings, FleetConfig, QueueConfig
from sdfleet.storage.base import BlobStore
from sdfleet.store.base import TaskStore
from sdfleet.tasks import Task, TaskRecord
from sdfleet.telemetry import Metrics, tracer


@dataclass
class Parts:
    """Everything an agent works with, built by the CLI from settings."""

    bus: Bus
    store: TaskStore
    storage: BlobStore
    runtime: Runtime
    notifiers: Sequence[Notifier]
    fetcher: InputFetcher
    queue: QueueConfig
    fleet: FleetConfig
    settings: AgentSettings
    worker_id: str
    metrics: Metrics
    keeper: TopologyKeeper
    """Puts the topology back when the engine lost it (where ``ensure_topology`` allows)."""


@dataclass(eq=False)  # identity: a task in the agent's sets and maps
class Prepared:
    """A received task whose inputs are already fetched, on its way through the agent's stages."""

    handle: DeliveryHandle
    task: Task
    inputs: list[bytes]
    span: trace.Span
    """``agent.task``: opened when the task is received, ended when its delivery is settled."""
    record: TaskRecord | None = None
    """The record as this agent last read or wrote it (saves a read before the next write);
    None for a task another producer published, whose record the agent creates as it starts."""
    mask: bytes | None = None
    """An image-to-image task's inpainting mask, fetched with its inputs."""
    numbered: bool = True
    """Whether its message numbers its run (sdfleet's own ``Task`` JSON); False for a seed
    message, whose run the agent tells by its publish."""
    publish: str | None = None
    """The publish its delivery comes from (``Decoded.publish``), written to the record it starts."""
    timings: dict[str, float] = field(default_factory=dict)
    cancelled: bool = False
    start_by: float | None = None
    """When its ``ttl_s`` runs out (epoch seconds; ``expiry``): it is not started after that."""
    ready_at: float = 0.0
    """Monotonic time it entered the ready pool (for the pool order's pass-over bound)."""
    run_started: float | None = None
    """Monotonic time its runtime call began (the cancel watch checks tasks running for a while)."""
    cancel_checked: float | None = None
    """Monotonic time the cancel watch last read its record."""
    taken_over: str | None = None
    """The agent that took the task over, once the cancel watch read it in the record (this
    agent's lease lapsed): its run is interrupted and its outcome not written."""
    light: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when what is left of finishing is waiting for notifications to go out, then the ack."""
    job: Job | None = None
    """What the runtime gets (``execute.job_of``), built once: the pool's order and batching read
    its model each time they look, and a task that names none would list the models folder."""

    @property
    def delivery(self) -> Delivery:
        return self.handle.delivery

    @contextmanager
    def stage(self, name: str, timing: str | None = None) -> Iterator[trace.Span]:
        """A child span of ``agent.task`` (``inputs.fetch``, ``storage.put``…); when the stage
        ends without an error, ``timings[timing]`` is its span's duration, so the record and
        the trace agree (timed apart, a thread switch between them was 5 ms of difference)."""
        ctx = trace.set_span_in_context(self.span)
        attributes = {"sdfleet.task_id": self.task.id}
        t0 = time.perf_counter()
        with tracer().start_as_current_span(name, context=ctx, attributes=attributes) as span:
            yield span
        if timing is not None:
            start, end = getattr(span, "start_time", None), getattr(span, "end_time", None)
            if isinstance(start, int) and isinstance(end, int):  # a recording span
                self.timings[timing] = (end - start) / 1e9
            else:
                self.timings[timing] = time.perf_counter() - t0

    def past_stage(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """A child span for a stage measured after the fact (inside the runtime, in the pool),
        ended at once: its ``error`` is recorded before that (an ended span takes nothing more)."""
        ctx = trace.set_span_in_context(self.span)
        span = tracer().start_span(name, context=ctx, start_time=start_ns)
        span.set_attributes({"sdfleet.task_id": self.task.id, **(attributes or {})})
        if error is not None:
            span.record_exception(error)
            span.set_status(trace.StatusCode.ERROR, str(error))
        span.end(end_time=max(start_ns, end_ns))


def output_keys(task: Task, outputs: Sequence[bytes], tag: str | None = None) -> tuple[list[str], str]:
    """The seed's layout: ``<prefix>/<id>/<id>-<tag>-<n>.<ext>`` per output, its extension told by
    its bytes (PNG, GIF, WebP, MP4…), and ``<prefix>/<id>/<id>-<tag>.out``. ``tag`` (4 random hex
    digits by default) keeps a re-used id from overwriting earlier results."""
    tag = tag or secrets.token_hex(2)
    base = f"{task.results_folder()}/{task.id}-{tag}"
    return [f"{base}-{n}.{sniff(data).ext}" for n, data in enumerate(outputs, 1)], f"{base}.out"
