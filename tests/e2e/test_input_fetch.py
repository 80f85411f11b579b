"""An input image the agent cannot fetch, through the whole agent: a lasting refusal (HTTP 404)
fails the task at once; one that may pass (HTTP 503, a timeout, a server that is down) is a failed
attempt, retried like a failed run, and fails only on the task's last receive; and an agent taking
over a task whose record says another agent runs it does not fail that task for an input it could
not fetch. These are the prepare stage's rules, not an engine's: sqlite."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fleet_tools import dead_letters, serving, task_events, task_records

from conftest import Engine, StartFleet, fleet_settings
from sdfleet.bus import open_bus
from sdfleet.settings import QueueConfig, Settings
from sdfleet.store import open_store
from sdfleet.store.base import transition
from sdfleet.tasks import TaskRecord, TaskResult, TaskState

pytestmark = [pytest.mark.timeout(120), pytest.mark.parametrize("engine", ["sqlite"], indirect=True)]

QUEUE = [QueueConfig(name="q", runtime="synthetic")]
PARAMS = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3}


class Inputs:
    """Input images by path, each request counted: ``/flaky/<n>.png`` answers 503 to its first
    ``n`` requests, then the image; ``/busy.png`` 429 with ``Retry-After: 3`` once, then the
    image; ``/down.png`` always 503; anything else 404."""

    def __init__(self) -> None:
        from sdfleet.demo import _input_image

        self.png = _input_image()
        self.asked: Counter[str] = Counter()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        self.asked[path] += 1
        status, body, headers = 404, b"no such image", []
        if path == "/busy.png" and self.asked[path] == 1:
            status, body, headers = 429, b"slow down", [(b"retry-after", b"3")]
        elif path == "/busy.png":
            status, body = 200, self.png
        elif path == "/down.png":
            status, body = 503, b"try again later"
        elif path.startswith("/flaky/"):
            fails = int(path.removeprefix("/flaky/").removesuffix(".png"))
            status, body = (503, b"try again later") if self.asked[path] <= fails else (200, self.png)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(autouse=True)
def _task_events(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sdfleet.agent.task")


def _delays(caplog: pytest.LogCaptureFixture, task_id: str) -> list[float]:
    """The ``delay_s`` of each ``requeued`` of ``task_id``: when its next try was due."""
    return [r.delay_s for r in task_records(caplog, task_id) if r.event == "requeued"]


def _settings(engine: Engine, models_dir: Path, **agent: Any) -> Settings:
    """Queue ``q`` on an instant synthetic runtime, three receives per task."""
    runtimes = {"synthetic": {"latency_s": 0}}
    return fleet_settings(engine, models_dir, QUEUE, runtimes=runtimes, max_receives=3, **agent)


def _img2img(url: str) -> dict[str, Any]:
    return {"type": "image-to-image", "params": {**PARAMS, "init_images": [url]}}


async def _dead_ids(engine: Engine) -> list[str]:
    return [json.loads(body)["id"] for body in await dead_letters(engine)]


async def test_an_input_that_may_come_back_is_retried_and_one_gone_for_good_fails_at_once(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every input fetch failure used to fail its task at once, a passing 503 or timeout too: one
    hiccup of the server holding the inputs (a CDN, S3 throttling) failed a burst of tasks."""
    s = _settings(engine, models_dir)
    inputs = Inputs()
    async with serving(inputs) as url:
        fleet = await start_fleet(QUEUE, settings=s)
        flaky, down, gone = [
            (await fleet.http.post("/v1/tasks", json=_img2img(f"{url}{path}"))).json()["id"]
            for path in ("/flaky/2.png", "/down.png", "/gone.png")
        ]
        # While it waits for its retry, the client sees why.
        deadline = time.monotonic() + 30
        while (view := (await fleet.http.get(f"/v1/tasks/{flaky}")).json())["error"] is None:
            assert time.monotonic() < deadline, view
            await asyncio.sleep(0.1)
        assert view["state"] == "queued" and "HTTP 503" in view["error"]["message"], view
        views = {task_id: await fleet.wait(task_id, timeout_s=60) for task_id in (flaky, down, gone)}
    assert views[flaky]["state"] == "succeeded" and views[flaky]["error"] is None, views[flaky]
    assert inputs.asked["/flaky/2.png"] == 3
    assert task_events(caplog, flaky) == ["requeued", "requeued", "received", "started", "succeeded"]
    # Backing off, though agent.retry_delay_s is 0: the server is not asked again at once.
    assert _delays(caplog, flaky) == [1.0, 2.0]

    assert views[down]["state"] == "failed", views[down]
    assert views[down]["error"]["code"] == "input_fetch_failed"
    assert views[down]["error"]["message"].endswith("HTTP 503 (after 3 attempts)"), views[down]
    assert inputs.asked["/down.png"] == 3
    assert task_events(caplog, down) == ["requeued", "requeued", "failed"]
    assert await _dead_ids(engine) == [down]  # like a run's last failed attempt

    assert views[gone]["state"] == "failed", views[gone]
    assert views[gone]["error"]["code"] == "input_fetch_failed"
    assert views[gone]["error"]["message"].endswith("HTTP 404"), views[gone]
    assert inputs.asked["/gone.png"] == 1
    assert task_events(caplog, gone) == ["failed"]


async def test_a_takeover_that_cannot_fetch_the_input_leaves_the_running_task_to_its_agent(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A task whose record says another agent runs it comes back (that agent's lease lapsed: a
    stalled event loop, or it died), and the input is gone by now (404). The agent taking over
    used to fail the task at once, and the other agent, alive after all, then had its images
    refused (``finished but not recorded``). Now the delivery is retried; the other agent's
    result stands, and the next receive drops the message."""
    s = _settings(engine, models_dir, retry_delay_s=2.0)
    inputs = Inputs()
    store = open_store(engine.store_url)
    bus = open_bus(engine.bus_url)
    try:
        async with serving(inputs) as url:
            api = await start_fleet(QUEUE, settings=s, agents=[])
            task_id = (await api.http.post("/v1/tasks", json=_img2img(f"{url}/gone.png"))).json()["id"]
            # The stalled agent: it received the message, started the task, and its lease lapsed.
            (d,) = await bus.receive("q", wait_s=5, lease_s=30)
            stalled = "stalled-agent"

            def start(r: TaskRecord) -> TaskRecord:
                r.state, r.worker, r.attempts, r.started_at = TaskState.RUNNING, stalled, 1, time.time()
                return r

            await transition(store, "default", task_id, start)
            await bus.release(d)
            await start_fleet(QUEUE, settings=s, with_api=False)
            deadline = time.monotonic() + 30
            while "requeued" not in task_events(caplog, task_id):
                assert "failed" not in task_events(caplog, task_id), task_events(caplog, task_id)
                assert time.monotonic() < deadline, "the agent never took the message"
                await asyncio.sleep(0.05)
            record = await store.get("default", task_id)
            assert record is not None and (record.state, record.worker, record.error) == (
                TaskState.RUNNING,
                stalled,
                None,
            ), record

            def succeed(r: TaskRecord) -> TaskRecord:  # the stalled agent wakes and finishes
                r.state, r.progress, r.finished_at = TaskState.SUCCEEDED, 1.0, time.time()
                r.result = TaskResult(images=[], output=None)
                return r

            await transition(store, "default", task_id, succeed)
            view = await api.wait(task_id, timeout_s=30)
            deadline = time.monotonic() + 30
            while "dropped" not in task_events(caplog, task_id):  # its retry, 2 s on
                assert time.monotonic() < deadline, task_events(caplog, task_id)
                await asyncio.sleep(0.05)
            # The drop is acked once its subscribers are told again (records.ack_when_told), just after.
            deadline = time.monotonic() + 10
            stats = await bus.stats("q")
            while stats.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                stats = await bus.stats("q")
    finally:
        await store.aclose()
        await bus.aclose()
    assert view["state"] == "succeeded", view
    assert task_events(caplog, task_id) == ["requeued", "dropped"]
    assert inputs.asked["/gone.png"] == 1
    assert (stats.visible, stats.in_flight, stats.dead_letters) == (0, 0, 0), stats


async def test_an_input_the_runtime_could_not_fetch_now_is_retried_with_the_same_backoff(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A URL inside the job (a ControlNet input in an SD WebUI body, a ComfyUI ``LoadImage``) is
    fetched by the runtime; "not now" there is a failed attempt too, released after 1 s, then 2 s,
    though ``agent.retry_delay_s`` is 0 (it came straight back, and failed within milliseconds)."""
    queue = [QueueConfig(name="q", runtime="fakes.runtimes:AlwaysFails")]
    options = {"message": "fetching https://cdn.example/pose.png failed: HTTP 503", "input_unavailable": True}
    runtimes = {"fakes.runtimes:AlwaysFails": options}
    s = fleet_settings(engine, models_dir, queue, runtimes=runtimes, max_receives=3)
    fleet = await start_fleet(queue, settings=s)
    task_id = (await fleet.http.post("/v1/tasks", json={"params": PARAMS})).json()["id"]
    view = await fleet.wait(task_id, timeout_s=60)
    assert view["state"] == "failed" and view["error"]["code"] == "input_fetch_failed", view
    assert view["error"]["message"].endswith("HTTP 503 (after 3 attempts)"), view
    assert _delays(caplog, task_id) == [1.0, 2.0]
    assert await _dead_ids(engine) == [task_id]


async def test_an_input_server_that_asks_for_a_wait_gets_it(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """429 with ``Retry-After: 3``: the next try comes 3 s later, not after the first 1 s."""
    s = _settings(engine, models_dir)
    inputs = Inputs()
    async with serving(inputs) as url:
        fleet = await start_fleet(QUEUE, settings=s)
        task_id = (await fleet.http.post("/v1/tasks", json=_img2img(f"{url}/busy.png"))).json()["id"]
        view = await fleet.wait(task_id, timeout_s=60)
    assert view["state"] == "succeeded", view
    assert inputs.asked["/busy.png"] == 2
    assert _delays(caplog, task_id) == [3.0]
    assert [r.code for r in task_records(caplog, task_id) if r.event == "requeued"] == ["input_fetch_failed"]
