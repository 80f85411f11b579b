"""The run stage: one runtime call for a task, or for a batch of compatible tasks.

This is the only stage that holds the GPU. It returns an outcome per task (a result or the error
that ended it) and leaves recording, storing, notifying and acking to the finish stage, which runs
concurrently with the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from opentelemetry import trace

from sdfleet.agent.parts import Parts, Prepared
from sdfleet.agent.records import notify
from sdfleet.errors import GenerationTimeout, SdfleetError
from sdfleet.runtimes.base import Job, ProgressFn, Runtime, RuntimeResult
from sdfleet.store.base import transition
from sdfleet.tasks import EventType, TaskRecord, TaskState

log = logging.getLogger(__name__)

Outcome = RuntimeResult | BaseException
PROGRESS_EVERY_S = 1.0
"""Least time between two progress writes of one task; a task shorter than this writes none."""


@runtime_checkable
class BatchRuntime(Protocol):
    """A runtime that can run compatible jobs as one call (dynamic batching)."""

    max_batch: int
    """Most images one call may make; 1: no batching."""
    batch_wait_s: float
    """Longest a task waits for batch-mates once the runtime could take it."""

    def batch_key(self, job: Job) -> object | None:
        """Jobs with equal, non-None keys may run in one call."""

    async def run_batch(self, jobs: Sequence[Job], progress: Sequence[ProgressFn]) -> list[Outcome]:
        """One outcome per job, in order: its result, or the error that failed it alone."""


def batching(runtime: Runtime) -> BatchRuntime | None:
    if isinstance(runtime, BatchRuntime) and runtime.max_batch > 1:
        return runtime
    return None


def job_of(parts: Parts, p: Prepared) -> Job:
    task = p.task
    return Job(
        task_id=task.id,
        type=task.type,
        model=task.model or parts.queue.model or parts.fleet.models.default,
        params=task.params,
        init_images=p.inputs,
        timeout_s=task.timeout_s,
    )


async def run_tasks(parts: Parts, batch: Sequence[Prepared]) -> list[Outcome]:
    """Run ``batch`` (one task, or batch-mates) in one runtime call; never raises."""
    jobs = [job_of(parts, p) for p in batch]
    reporters = [_Progress(parts, p) for p in batch]
    timeouts = [j.timeout_s for j in jobs if j.timeout_s is not None]
    runtime = parts.runtime
    t0, wall0 = time.perf_counter(), time.time_ns()
    for p in batch:
        p.run_started = time.monotonic()
    with _stage_spans(batch, jobs[0].model) as spans:
        outcomes = await _call(runtime, jobs, reporters, min(timeouts) if timeouts else None)
        for span, outcome in zip(spans, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                span.record_exception(outcome)
    elapsed = time.perf_counter() - t0
    switched = any(isinstance(o, RuntimeResult) and o.switch_s > 0 for o in outcomes)
    if switched:
        parts.metrics.model_switches.labels(queue=parts.queue.name).inc()
    for p, outcome in zip(batch, outcomes, strict=True):
        download_s = outcome.download_s if isinstance(outcome, RuntimeResult) else 0.0
        if download_s > 0:
            p.timings["model_download"] = download_s
            p.past_stage("model.download", wall0, wall0 + int(download_s * 1e9))
        switch_s = outcome.switch_s if isinstance(outcome, RuntimeResult) else 0.0
        if switch_s > 0:
            p.timings["model_switch"] = switch_s
            start = wall0 + int(download_s * 1e9)  # the switch follows the download
            p.past_stage("model.switch", start, start + int(switch_s * 1e9))
        run_s = outcome.run_s if isinstance(outcome, RuntimeResult) else None
        before = download_s + switch_s
        p.timings["runtime_run"] = max(0.0, elapsed - before) if run_s is None else run_s
        if run_s is not None and elapsed - before - run_s > 0.001:
            p.timings["runtime_wait"] = elapsed - before - run_s
        parts.metrics.observe_stages(parts.queue.name, p.timings)
    return outcomes


async def _call(
    runtime: Runtime, jobs: Sequence[Job], reporters: Sequence[_Progress], timeout_s: float | None
) -> list[Outcome]:
    many = batching(runtime) if len(jobs) > 1 else None
    try:
        async with asyncio.timeout(timeout_s):
            if many is not None:
                return await many.run_batch(jobs, [r.report for r in reporters])
            return [await runtime.run(jobs[0], reporters[0].report)]
    except TimeoutError:
        for job in jobs:
            await runtime.interrupt(job.task_id)
        error = GenerationTimeout(f"generation took longer than {timeout_s:g} s")
        return [error for _ in jobs]
    except Exception as e:  # the finish stage tells a runtime bug from a failure or a Reject
        return [e for _ in jobs]


@contextlib.contextmanager
def _stage_spans(batch: Sequence[Prepared], model: str | None) -> Iterator[list[trace.Span]]:
    with contextlib.ExitStack() as stack:
        spans = []
        for p in batch:
            span = stack.enter_context(p.stage("runtime.run"))
            span.set_attribute("sdfleet.model", model or "")
            span.set_attribute("sdfleet.batch_size", len(batch))
            spans.append(span)
        yield spans


class _Progress:
    """A task's progress, written to its record at most every ``PROGRESS_EVERY_S`` (never the
    final 1.0: the success write says that)."""

    def __init__(self, parts: Parts, p: Prepared) -> None:
        self.parts, self.p = parts, p
        self.last = time.monotonic()

    async def report(self, fraction: float) -> None:
        now = time.monotonic()
        if fraction >= 1.0 or now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        record = await _write_progress(self.parts, self.p, fraction)
        if record is not None and record.state is TaskState.RUNNING:
            await notify(self.parts, record, EventType.PROGRESS)


async def _write_progress(parts: Parts, p: Prepared, fraction: float) -> TaskRecord | None:
    def mutate(r: TaskRecord) -> TaskRecord | None:
        if r.state is not TaskState.RUNNING or r.worker != parts.worker_id:
            return None
        r.progress = round(min(1.0, fraction), 4)
        return r

    if p.record is None or p.record.state is not TaskState.RUNNING:
        return None  # not started yet (its start write is still in flight)
    try:
        record = await transition(parts.store, p.task.id, mutate, current=p.record)
    except SdfleetError as e:  # progress is best effort
        log.debug("progress of %s not saved: %s", p.task.id, e)
        return None
    p.record = record
    return record
