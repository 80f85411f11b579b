"""One prepared task end to end: runtime → storage → record → notify → ack.

Every exit path settles the delivery exactly once (ack, or release for a retry) and leaves the
record in a state that tells the client what happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from functools import partial

from opentelemetry import trace
from opentelemetry.trace import StatusCode

from sdfleet.agent.outage import ride_out
from sdfleet.agent.parts import Parts, Prepared, image_keys
from sdfleet.agent.records import fail, notify, notify_if_cancelled_unrun, requeue
from sdfleet.bus.base import Delivery
from sdfleet.errors import (
    GenerationTimeout,
    Interrupted,
    NotFound,
    Reject,
    RuntimeFailure,
    SdfleetError,
    TransitionConflict,
)
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.store.base import transition
from sdfleet.tasks import EventType, TaskRecord, TaskResult, TaskState

log = logging.getLogger(__name__)


async def execute(parts: Parts, p: Prepared) -> None:
    """Run a prepared task and settle its delivery; ends the task's ``agent.task`` span."""
    try:
        # current span while it runs, so log lines carry its trace id and task id
        with trace.use_span(p.span, end_on_exit=False):
            await _execute(parts, p)
    finally:
        p.span.end()


async def _execute(parts: Parts, p: Prepared) -> None:
    d, task = p.delivery, p.task
    try:
        start = partial(transition, parts.store, task.tenant, task.id, lambda r: _start(r, parts, d))
        record = await ride_out(start, f"starting {task.id}", parts.fleet.retry.lease_s)
    except (TransitionConflict, NotFound) as e:
        log.info("task %s not started: %s", task.id, e)
        await notify_if_cancelled_unrun(parts, await parts.store.get(task.tenant, task.id))
        await p.handle.ack()
        return
    await notify(parts, record, EventType.STARTED)
    try:
        result = await _run(parts, p)
        await _succeed(parts, p, result)
    except Reject as e:
        p.span.set_status(StatusCode.ERROR, e.reason)
        await fail(parts, task.tenant, task.id, e.code, e.reason)
        await p.handle.ack()
    except Interrupted:
        await _interrupted(parts, p)
    except (RuntimeFailure, SdfleetError) as e:
        await _retry_or_fail(parts, p, e.code, e.message or str(e))
    except Exception as e:  # a runtime bug must not kill the agent; it counts as a failed attempt
        log.exception("task %s: unexpected error", task.id)
        await _retry_or_fail(parts, p, "runtime_failure", f"{type(e).__name__}: {e}")


def _start(r: TaskRecord, parts: Parts, d: Delivery) -> TaskRecord | None:
    if r.state is TaskState.RUNNING:
        if r.worker == parts.worker_id:
            return None  # our own start, applied by a server that went away before it replied
        if d.receive_count <= 1:
            # Another agent holds a copy of this task (a re-published submit); only a redelivery,
            # whose receive count is 2 or more, takes over from an agent that died.
            raise TransitionConflict(f"already running on {r.worker}")
    r.state = TaskState.RUNNING
    r.attempts = max(r.attempts + 1, d.receive_count)
    r.worker = parts.worker_id
    r.runtime = parts.runtime.name
    r.started_at = time.time()
    r.progress = 0.0
    return r


async def _run(parts: Parts, p: Prepared) -> RuntimeResult:
    task = p.task
    job = Job(
        task_id=task.id,
        type=task.type,
        model=task.model or parts.queue.model or parts.fleet.models.default,
        params=task.params,
        init_images=p.inputs,
        timeout_s=task.timeout_s,
    )
    before = parts.runtime.loaded_model
    last = 0.0

    async def progress(fraction: float) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 1.0 or fraction >= 1.0:  # throttle store writes
            last = now
            await _progress(parts, task.tenant, task.id, fraction)

    t0, wall0 = time.perf_counter(), time.time_ns()
    with p.stage("runtime.run") as span:
        span.set_attribute("sdfleet.model", job.model or "")
        try:
            result = await asyncio.wait_for(parts.runtime.run(job, progress), timeout=task.timeout_s)
        except TimeoutError as e:
            await parts.runtime.interrupt(task.id)
            raise GenerationTimeout(f"generation took longer than {task.timeout_s} s") from e
    elapsed = time.perf_counter() - t0
    if result.switch_s > 0:  # the switch happens first, inside the runtime's run
        p.timings["model_switch"] = result.switch_s
        p.past_stage("model.switch", wall0, wall0 + int(result.switch_s * 1e9))
    p.timings["runtime_run"] = max(0.0, elapsed - result.switch_s)
    if parts.runtime.loaded_model != before:
        parts.metrics.model_switches.labels(queue=parts.queue.name).inc()
    parts.metrics.observe_stages(parts.queue.name, p.timings)
    return result


async def _progress(parts: Parts, tenant: str, task_id: str, fraction: float) -> None:
    def mutate(r: TaskRecord) -> TaskRecord | None:
        if r.state is not TaskState.RUNNING:
            return None
        r.progress = round(min(1.0, fraction), 4)
        return r

    try:
        record = await transition(parts.store, tenant, task_id, mutate)
    except SdfleetError as e:  # progress is best effort
        log.debug("progress of %s not saved: %s", task_id, e)
        return
    if record.state is TaskState.RUNNING:
        await notify(parts, record, EventType.PROGRESS)


async def _store_outputs(parts: Parts, p: Prepared, result: RuntimeResult) -> TaskResult:
    task = p.task
    keys, out_key = image_keys(task, len(result.images))
    t0 = time.perf_counter()
    with p.stage("storage.put"):
        puts = (parts.storage.put(k, img, "image/png") for k, img in zip(keys, result.images, strict=True))
        await asyncio.gather(*puts)
        info = {**result.info, "images": [parts.storage.location(k) for k in keys], "task_id": task.id}
        await parts.storage.put(out_key, json.dumps(info, indent=2).encode(), "application/json")
    p.timings["storage_put"] = time.perf_counter() - t0
    parts.metrics.observe_stages(parts.queue.name, {"storage_put": p.timings["storage_put"]})
    return TaskResult(images=keys, output=out_key, seed=result.seed, timings=dict(p.timings))


async def _succeed(parts: Parts, p: Prepared, result: RuntimeResult) -> None:
    task = p.task
    res = await _store_outputs(parts, p, result)

    def mutate(r: TaskRecord) -> TaskRecord | None:
        if r.state is TaskState.SUCCEEDED and r.result == res:
            return None  # our own write, applied by a server that went away before it replied
        r.state, r.result, r.progress, r.error = TaskState.SUCCEEDED, res, 1.0, None
        r.finished_at = time.time()
        return r

    lease_s = parts.fleet.retry.lease_s
    try:
        record = await ride_out(
            partial(transition, parts.store, task.tenant, task.id, mutate), f"recording {task.id}", lease_s
        )
    except TransitionConflict as e:  # cancelled (or finished elsewhere) meanwhile: no second result
        log.info("task %s finished but not recorded: %s", task.id, e)
        await p.handle.ack()
        return
    parts.metrics.tasks.labels(queue=parts.queue.name, state="succeeded").inc()
    with p.stage("notify"):
        await notify(parts, record, EventType.SUCCEEDED)
    await ride_out(p.handle.ack, f"acking {task.id}", lease_s)


async def _interrupted(parts: Parts, p: Prepared) -> None:
    if p.cancelled:  # the API already wrote the terminal state; tell the subscribers
        record = await parts.store.get(p.task.tenant, p.task.id)
        if record is not None:
            await notify(parts, record, EventType.CANCELLED)
        await p.handle.ack()
        return
    await requeue(parts, p.task.tenant, p.task.id, "interrupted", "agent shut down before the task finished")
    await p.handle.release()


async def _retry_or_fail(parts: Parts, p: Prepared, code: str, message: str) -> None:
    d = p.delivery
    p.span.set_status(StatusCode.ERROR, message)
    log.warning("task %s attempt %d failed: %s", p.task.id, d.receive_count, message)
    if d.receive_count >= parts.fleet.retry.max_receives:
        await fail(parts, p.task.tenant, p.task.id, code, f"{message} (after {d.receive_count} attempts)")
        # Not acked: the bus moves a message that used up its receives to the dead-letter queue.
        await p.handle.release()
    else:
        await requeue(parts, p.task.tenant, p.task.id, code, message)
        await p.handle.release(parts.settings.retry_delay_s)
