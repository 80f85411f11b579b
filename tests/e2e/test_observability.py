"""Traces cross the queue (api.submit → traceparent attribute → agent.task and its stages), metrics
count what happened, JSON logs carry the trace id."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import OTHER, SD15, StartFleet
from sdfleet.settings import QueueConfig
from sdfleet.telemetry import JsonFormatter, TraceIdFilter, setup_tracing

# flows of the fleet's own logic: redis and aws in `make test-slow` (tests/conftest.py)
pytestmark = pytest.mark.flow

BODY = {"model": SD15, "params": {"prompt": "a red door", "steps": 2, "width": 64, "height": 64}}


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        setup_tracing("sdfleet-test", exporter=exporter)
    else:  # the process already has a provider: add our exporter to it
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider = trace.get_tracer_provider()
        assert isinstance(provider, TracerProvider)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter


@pytest.mark.flow(engines="all")  # the traceparent rides the engine's message attributes
async def test_trace_crosses_the_queue(start_fleet: StartFleet, spans: InMemorySpanExporter) -> None:
    fleet = await start_fleet()
    r = await fleet.http.post("/v1/tasks", json=BODY)
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    assert (await fleet.wait(task_id))["state"] == "succeeded"
    await fleet.stop()  # ends every span
    done = [
        s
        for s in spans.get_finished_spans()
        if s.attributes and s.attributes.get("sdfleet.task_id") == task_id
    ]
    by_name = {s.name: s for s in done}
    assert {"api.submit", "agent.task"} <= set(by_name), [s.name for s in done]
    submit, agent = by_name["api.submit"], by_name["agent.task"]
    assert submit.context is not None and agent.context is not None
    assert agent.context.trace_id == submit.context.trace_id
    assert agent.parent is not None and agent.parent.span_id == submit.context.span_id
    children = {
        s.name
        for s in spans.get_finished_spans()
        if s.parent is not None and s.parent.span_id == agent.context.span_id
    }
    assert {"queue.wait", "inputs.fetch", "runtime.run", "storage.put", "notify"} <= children


def _task_spans(spans: InMemorySpanExporter, task_id: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for s in spans.get_finished_spans():
        if s.attributes and s.attributes.get("sdfleet.task_id") == task_id:
            out.setdefault(s.name, []).append(s)
    return out


def _seconds(span: Any) -> float:
    return (span.end_time - span.start_time) / 1e9


async def test_stage_spans_say_what_the_records_say(
    start_fleet: StartFleet, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sdfleet.agent.task")
    caplog.set_level(logging.INFO, logger="sdfleet.api.submit")
    fleet = await start_fleet()
    ids = []
    for model in (OTHER, OTHER):  # the dynamic queue starts on SD15: the first task switches, not the second
        r = await fleet.http.post("/v1/tasks", json={**BODY, "model": model})
        ids.append(r.json()["id"])
        assert (await fleet.wait(ids[-1]))["state"] == "succeeded"
    refused = await fleet.http.post(
        "/v1/tasks",
        json={
            **BODY,
            "type": "image-to-image",
            "params": {**BODY["params"], "init_images": ["s3://no-such-bucket/k.png"]},
        },
    )
    ids.append(refused.json()["id"])
    assert (await fleet.wait(ids[-1]))["state"] == "failed"
    await fleet.stop()
    first, second, bad = (_task_spans(spans, i) for i in ids)
    (switch,) = first["model.switch"]
    (run,) = first["runtime.run"]
    assert switch.end_time <= run.start_time, "the run starts after the switch"
    assert "model.switch" not in second
    for found in (first, second):
        (wait,) = found["queue.wait"]
        assert wait.attributes["sdfleet.queue"] == "dynamic"
        assert {"pool.wait", "inputs.fetch", "runtime.run", "storage.put", "notify"} <= set(found)
    (agent,) = bad["agent.task"]
    assert agent.status.status_code.name == "ERROR", agent.status
    assert "queue.wait" in bad
    events = [(r.task_id, r.event) for r in caplog.records if getattr(r, "task_id", None) in ids]
    # The API logs "queued" once the message is out, so the agent's "received" may come first.
    story = sorted(e for t, e in events if t == ids[0])
    assert story == ["queued", "received", "started", "succeeded"], events
    assert [e for t, e in events if t == ids[0] and e != "queued"] == ["received", "started", "succeeded"]
    assert sorted(e for t, e in events if t == ids[2]) == ["failed", "queued"], events
    assert all(getattr(r, "trace_id", "") for r in caplog.records if getattr(r, "task_id", None) in ids)


async def test_metrics_count_tasks_and_stages(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    r = await fleet.http.post("/v1/tasks", json=BODY)
    assert (await fleet.wait(r.json()["id"]))["state"] == "succeeded"
    await fleet.http.get("/v1/queues")
    text = (await fleet.http.get("/metrics")).text
    assert 'sdfleet_submitted_total{origin="v1",queue="sd15"} 1.0' in text
    assert 'sdfleet_tasks_total{queue="sd15",state="succeeded"} 1.0' in text
    assert 'sdfleet_stage_seconds_count{queue="sd15",stage="runtime_run"} 1.0' in text
    assert 'sdfleet_queue_visible{queue="sd15"} 0.0' in text


def test_json_logs_carry_trace_id(spans: InMemorySpanExporter) -> None:
    record = logging.makeLogRecord({"name": "sdfleet.agent", "msg": "task %s done", "args": ("t1",)})
    with trace.get_tracer("test").start_as_current_span("work") as span:
        assert TraceIdFilter().filter(record)
        line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "task t1 done"
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")


async def test_a_run_that_fails_has_an_error_span_and_no_ended_span_warnings(
    start_fleet: StartFleet, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """The ``runtime.run`` span is measured after the fact and ended at once: its error was set
    after that and lost, with "Tried calling set_status on an ended span" on every failed run."""
    caplog.set_level(logging.WARNING, logger="opentelemetry")
    queues = [QueueConfig(name="q", runtime="synthetic")]
    fleet = await start_fleet(queues, runtimes={"synthetic": {"latency_s": 20, "progress_steps": 40}})
    r = await fleet.http.post("/v1/tasks", json=BODY)
    task_id = r.json()["id"]
    for _ in range(200):
        if (await fleet.http.get(f"/v1/tasks/{task_id}")).json()["state"] == "running":
            break
        await asyncio.sleep(0.05)
    assert (await fleet.http.post(f"/v1/tasks/{task_id}/cancel")).status_code == 200
    assert (await fleet.wait(task_id, timeout_s=30))["state"] == "cancelled"
    await fleet.stop()
    (run,) = _task_spans(spans, task_id)["runtime.run"]
    assert run.status.status_code.name == "ERROR" and run.events[0].name == "exception", (
        run.status,
        run.events,
    )
    assert not [m for m in (rec.getMessage() for rec in caplog.records) if "ended span" in m]
