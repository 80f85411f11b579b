"""The run stage: one runtime call for a task, or for a batch of compatible tasks.

This is the only stage that holds the GPU. It returns an outcome per task (a result or the error
that ended it) and leaves recording, storing, notifying and acking to the finish stage, which runs
concurrently with the next call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from sdfleet.agent.parts import Parts, Prepared
from sdfleet.agent.records import notify
from sdfleet.errors import GenerationTimeout, SdfleetError
from sdfleet.models.catalog import ModelCatalog, default_model
from sdfleet.runtimes.base import Job, ProgressFn, Runtime, RuntimeResult
from sdfleet.store.base import transition
from sdfleet.tasks import EventType, TaskRecord, TaskState

log = logging.getLogger(__name__)

Outcome = RuntimeResult | BaseException


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
    """``p``'s job, built on first use (after its inputs are fetched) and kept.

    Its time limit is the task's ``timeout_s``, at most the queue's ``task_timeout_s``: the API
    caps the tasks it takes, but one another producer published (the seed's Lambda, a script) may
    carry none, and no task may outlast the drain its worker is given on scale-in."""
    if p.job is None:
        task, models, limit = p.task, parts.fleet.models, parts.queue.task_timeout_s
        p.job = Job(
            task_id=task.id,
            type=task.type,
            model=task.model or parts.queue.model or default_model(models.default, ModelCatalog(models.dir)),
            params=task.params,
            init_images=p.inputs,
            mask=p.mask,
            timeout_s=limit if task.timeout_s is None else min(task.timeout_s, limit),
        )
    return p.job


async def run_tasks(parts: Parts, batch: Sequence[Prepared]) -> list[Outcome]:
    """Run ``batch`` (one task, or batch-mates) in one runtime call; never raises.

    Stages, the same in records (``timings``), metrics (``sdfleet_stage_seconds``) and spans:
    ``pool_wait`` / ``pool.wait`` from prepared to the call; ``runtime_wait`` / ``runtime.wait`` the
    part of the call not on the device (queued behind another job, encoding images);
    ``model_switch`` / ``model.switch`` only for a real switch; ``runtime_run`` / ``runtime.run``
    the job's time on the device (the whole call, less the switch, for a runtime that cannot say);
    ``gpu_seconds`` (records only) the task's share of switch + run, ``sdfleet_gpu_seconds_total``
    their sum.
    """
    jobs = [job_of(parts, p) for p in batch]
    reporters = [_Progress(parts, p) for p in batch]
    timeouts = [j.timeout_s for j in jobs if j.timeout_s is not None]
    t0, wall0, mono0 = time.perf_counter(), time.time_ns(), time.monotonic()
    for p in batch:
        p.run_started = mono0
        pool_wait = max(0.0, mono0 - p.ready_at) if p.ready_at else 0.0
        p.timings["pool_wait"] = pool_wait
        p.past_stage("pool.wait", wall0 - int(pool_wait * 1e9), wall0)
    outcomes = await _call(parts.runtime, jobs, reporters, min(timeouts) if timeouts else None)
    elapsed = time.perf_counter() - t0
    if any(isinstance(o, RuntimeResult) and o.switch_s > 0 for o in outcomes):
        parts.metrics.model_switches.labels(queue=parts.queue.name).inc()
    gpu_s = 0.0
    for p, job, outcome in zip(batch, jobs, outcomes, strict=True):
        _record_stages(
            p, outcome, elapsed, wall0, {"sdfleet.model": job.model or "", "sdfleet.batch_size": len(batch)}
        )
        p.timings["gpu_seconds"] = _gpu_share(p, outcome, len(batch))
        gpu_s += p.timings["gpu_seconds"]
        parts.metrics.observe_stages(parts.queue.name, p.timings)
    parts.metrics.gpu_seconds.labels(queue=parts.queue.name).inc(gpu_s)
    return outcomes


def _gpu_share(p: Prepared, outcome: Outcome, batch_size: int) -> float:
    """The task's part of the device time (switch + run) of the call it shared with batch-mates:
    summed over tasks it is ``sdfleet_gpu_seconds_total``; failed runs held the device too."""
    sharers = outcome.info.get("batch_tasks", 1) if isinstance(outcome, RuntimeResult) else batch_size
    held = p.timings.get("model_switch", 0.0) + p.timings["runtime_run"]
    return held / max(1, int(sharers))


def _record_stages(
    p: Prepared, outcome: Outcome, elapsed: float, wall0: int, attrs: dict[str, object]
) -> None:
    """Timings and past spans of one task's runtime call (see ``run_tasks``), laid out in the
    order they happen: waiting, the model's download, the switch, the run."""
    ok = isinstance(outcome, RuntimeResult)
    download_s = outcome.download_s if isinstance(outcome, RuntimeResult) else 0.0
    switch_s = outcome.switch_s if isinstance(outcome, RuntimeResult) else 0.0
    run_s = outcome.run_s if isinstance(outcome, RuntimeResult) else None
    before = download_s + switch_s
    run = max(0.0, elapsed - before) if run_s is None else min(run_s, elapsed)
    wait = max(0.0, elapsed - before - run)
    end = wall0 + int(elapsed * 1e9)
    run_from = end - int(run * 1e9)
    switch_from = run_from - int(switch_s * 1e9)
    download_from = switch_from - int(download_s * 1e9)
    if wait > 0.001:
        p.timings["runtime_wait"] = wait
        p.past_stage("runtime.wait", wall0, download_from)
    if download_s > 0:
        p.timings["model_download"] = download_s
        p.past_stage("model.download", download_from, switch_from)
    if switch_s > 0:
        p.timings["model_switch"] = switch_s
        p.past_stage("model.switch", switch_from, run_from)
    p.timings["runtime_run"] = run
    error = outcome if not ok and isinstance(outcome, BaseException) else None
    p.past_stage("runtime.run", run_from, end, attrs, error=error)


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


class _Progress:
    """A task's progress, written to its record at most every ``agent.progress_every_s`` (never
    the final 1.0: the success write says that)."""

    def __init__(self, parts: Parts, p: Prepared) -> None:
        self.parts, self.p = parts, p
        self.last = time.monotonic()

    async def report(self, fraction: float) -> None:
        now = time.monotonic()
        if fraction >= 1.0 or now - self.last < self.parts.settings.progress_every_s:
            return
        if self.p.record is None or self.p.record.state is not TaskState.RUNNING:
            return  # its start write is still in flight: the next step tries again
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

    try:
        record = await transition(parts.store, p.task.tenant, p.task.id, mutate, current=p.record)
    except SdfleetError as e:  # progress is best effort
        log.debug("progress of %s not saved: %s", p.task.id, e)
        return None
    if record.worker != parts.worker_id:
        return None  # taken over by another agent: ``p.record`` stays this agent's own
    p.record = record
    return record
