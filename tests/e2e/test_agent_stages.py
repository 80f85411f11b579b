"""The staged agent's guarantees on every engine: a crash in any stage still means one result and at
least one notification; SIGTERM with tasks in every stage loses nothing; a cancel reaches a running
task within seconds whatever the lease; batch-mates fail and cancel alone through the whole agent."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from fleet_tools import agent_process, drain, exists, serving, submit_all, task_events, write_fleet_file

from conftest import Engine, StartFleet, fleet_settings, free_port
from sdfleet.errors import RuntimeFailure
from sdfleet.settings import QueueConfig, Settings, WebhookSettings
from sdfleet.store import TaskStore
from sdfleet.tasks import TaskRecord, TaskState

# flows of the fleet's own logic: redis and aws in `make test-slow` (tests/conftest.py)
pytestmark = [pytest.mark.timeout(150), pytest.mark.flow]

QUEUE = [QueueConfig(name="q", runtime="synthetic")]
PARAMS = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3}


class StallingHook:
    """A webhook receiver that holds the first delivery of each task's ``hold`` events (``succeeded``)
    forever."""

    def __init__(self) -> None:
        self.url = ""
        self.events: list[tuple[str, str]] = []  # (task id, event), in arrival order
        self.held = asyncio.Event()
        self.hold = {"succeeded"}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        event, task_id = headers.get("x-sdfleet-event", ""), scope["path"].rsplit("/", 1)[-1]
        first = (task_id, event) not in self.events
        self.events.append((task_id, event))
        if event in self.hold and first:
            self.held.set()
            await asyncio.Event().wait()  # never answers: the agent is killed meanwhile
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
async def hook() -> AsyncIterator[StallingHook]:
    rec = StallingHook()
    async with serving(rec) as rec.url:
        yield rec


def settings(engine: Engine, models_dir: Path, latency_s: float, **agent: Any) -> Settings:
    runtimes = {"synthetic": {"latency_s": latency_s, "progress_steps": 4}}
    s = fleet_settings(engine, models_dir, QUEUE, runtimes=runtimes, lease_s=2, max_receives=3, **agent)
    s.webhook = WebhookSettings(allow_private=True, retry_backoff_s=0.05, max_retry_s=5, drain_s=0.5)
    return s


RUNNING = TaskState.RUNNING


def fleet_file(tmp_path: Path, s: Settings) -> Path:
    return write_fleet_file(tmp_path / "sdfleet.yaml", s.fleet.model_dump(mode="json"))


async def until(store: TaskStore, task_id: str, ok: Any, timeout_s: float = 60) -> TaskRecord:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = await store.get("default", task_id)
        if record is not None and ok(record):
            return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} never got there: {await store.get('default', task_id)}")


async def _killed_while_telling(
    start_fleet: StartFleet,
    engine: Engine,
    tmp_path: Path,
    s: Settings,
    store: TaskStore,
    hook: StallingHook,
    task_id: str,
    event: str,
) -> tuple[TaskRecord, TaskRecord]:
    """An agent process serves the queue until ``hook`` holds the task's ``event`` (recorded, its
    notification going out, not acked yet) and is SIGKILLed; the next agent must tell the receiver
    again. The record as the first agent left it, and after the second told."""
    with agent_process(engine, fleet_file(tmp_path, s), "q", SDFLEET_WEBHOOK__ALLOW_PRIVATE="true") as proc:
        await asyncio.wait_for(hook.held.wait(), 60)
        first = await store.get("default", task_id)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    await start_fleet(QUEUE, settings=s, agents=["q"], with_api=False)
    deadline = time.monotonic() + 30
    while hook.events.count((task_id, event)) < 2:
        assert time.monotonic() < deadline, hook.events
        await asyncio.sleep(0.1)
    record = await store.get("default", task_id)
    assert first is not None and record is not None
    return first, record


@pytest.mark.flow(engines="all")  # redelivery is the engine's
async def test_crash_between_record_and_ack_notifies_again_and_keeps_one_result(
    start_fleet: StartFleet,
    engine: Engine,
    models_dir: Path,
    tmp_path: Path,
    store: TaskStore,
    hook: StallingHook,
) -> None:
    s = settings(engine, models_dir, latency_s=0.2)
    api = await start_fleet(QUEUE, settings=s, agents=[])
    body = {"params": PARAMS, "webhook": {"url": f"{hook.url}/hook/t1", "events": ["succeeded"]}, "id": "t1"}
    r = await api.http.post("/v1/tasks", json=body)
    assert r.status_code == 202, r.text
    first, record = await _killed_while_telling(
        start_fleet, engine, tmp_path, s, store, hook, "t1", "succeeded"
    )
    assert first.state is TaskState.SUCCEEDED
    assert record.result == first.result and record.version == first.version
    assert await exists(engine, first.result.images[0])  # type: ignore[union-attr]
    notes = [n for n in await drain(engine, "results") if n.get("task_id") == "t1"]
    assert [n["type"] for n in notes] in (["succeeded"], ["succeeded", "succeeded"]), notes
    assert len({json.dumps(n, sort_keys=True) for n in notes}) == 1, notes  # a copy is the same event


async def test_crash_after_an_expiry_is_recorded_tells_the_subscribers_again(
    start_fleet: StartFleet,
    engine: Engine,
    models_dir: Path,
    tmp_path: Path,
    store: TaskStore,
    hook: StallingHook,
) -> None:
    """A task failed unrun (here past its ttl_s) whose agent dies before its notification is out:
    the next agent that gets the delivery finds it failed and tells the subscribers, as for a run."""
    s = settings(engine, models_dir, latency_s=0)
    api = await start_fleet(QUEUE, settings=s, agents=[])
    hook.hold = {"failed"}
    webhook = {"url": f"{hook.url}/hook/late", "events": ["failed"]}
    r = await api.http.post(
        "/v1/tasks", json={"id": "late", "params": PARAMS, "ttl_s": 1, "webhook": webhook}
    )
    assert r.status_code == 202, r.text
    await asyncio.sleep(1.5)  # no agent yet: past its ttl_s when one comes
    first, record = await _killed_while_telling(
        start_fleet, engine, tmp_path, s, store, hook, "late", "failed"
    )
    assert first.state is TaskState.FAILED and first.attempts == 0, first
    assert first.error is not None and first.error.code == "ttl_expired", first.error
    assert record.version == first.version and record.attempts == 0


async def test_tasks_failed_before_a_run_do_not_hold_up_receiving_while_their_webhooks_hang(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, store: TaskStore, hook: StallingHook
) -> None:
    """Six tasks past their ttl_s whose webhook receiver never answers, then one to run, on an
    agent that holds two at a time: each waits for its webhook before its ack, but no longer
    counts against what the agent may receive, so the task behind them runs at once."""
    s = settings(engine, models_dir, latency_s=0, prefetch=2)
    s.webhook.timeout_s = 4  # the held request gives up then (its retry is answered)
    api = await start_fleet(QUEUE, settings=s, agents=[])
    hook.hold = {"failed"}
    late = [f"late-{i}" for i in range(6)]
    for task_id in late:
        webhook = {"url": f"{hook.url}/hook/{task_id}", "events": ["failed"]}
        body = {"id": task_id, "params": PARAMS, "ttl_s": 1, "webhook": webhook}
        assert (await api.http.post("/v1/tasks", json=body)).status_code == 202
    assert (await api.http.post("/v1/tasks", json={"id": "fresh", "params": PARAMS})).status_code == 202
    await asyncio.sleep(1.5)
    await start_fleet(QUEUE, settings=s, agents=["q"], with_api=False)
    # Were they counted while their webhooks hang (4 s each), "fresh" would wait 12 s for its turn.
    view = await api.wait("fresh", timeout_s=8)
    assert view["state"] == "succeeded", view
    for task_id in late:
        record = await until(store, task_id, lambda r: r.state.terminal)
        assert record.error is not None and record.error.code == "ttl_expired", record
    assert {t for t, e in hook.events if e == "failed"} == set(late)


async def test_sigterm_while_an_expired_tasks_webhook_hangs_exits_and_it_is_told_again(
    start_fleet: StartFleet,
    engine: Engine,
    models_dir: Path,
    tmp_path: Path,
    store: TaskStore,
    hook: StallingHook,
) -> None:
    """Scale-in while a task failed before its run waits for its webhook (which would take the
    receiver's 10 s timeout): the agent exits within its drains (the agent's, the webhook
    notifier's), unacked, and the next agent tells the receiver again."""
    s = settings(engine, models_dir, latency_s=0)
    api = await start_fleet(QUEUE, settings=s, agents=[])
    hook.hold = {"failed"}
    webhook = {"url": f"{hook.url}/hook/late", "events": ["failed"]}
    body = {"id": "late", "params": PARAMS, "ttl_s": 1, "webhook": webhook}
    assert (await api.http.post("/v1/tasks", json=body)).status_code == 202
    await asyncio.sleep(1.5)
    env = {"SDFLEET_WEBHOOK__ALLOW_PRIVATE": "true", "SDFLEET_AGENT__DRAIN_S": "0.5"}
    env["SDFLEET_WEBHOOK__DRAIN_S"] = "0.5"  # what the notifier gives its deliveries on close
    with agent_process(engine, fleet_file(tmp_path, s), "q", **env) as proc:
        await asyncio.wait_for(hook.held.wait(), 60)
        asked = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        took_s = time.monotonic() - asked
    assert took_s < 5, f"the agent waited {took_s:.1f} s for the hung webhook"
    await start_fleet(QUEUE, settings=s, agents=["q"], with_api=False)
    deadline = time.monotonic() + 30
    while hook.events.count(("late", "failed")) < 2:
        assert time.monotonic() < deadline, hook.events
        await asyncio.sleep(0.1)
    record = await store.get("default", "late")
    assert record is not None and record.error is not None and record.error.code == "ttl_expired"


@pytest.mark.flow(engines="all")  # release is the engine's
async def test_sigterm_with_tasks_in_every_stage_loses_nothing(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, tmp_path: Path, store: TaskStore
) -> None:
    s = settings(engine, models_dir, latency_s=1.5)
    api = await start_fleet(QUEUE, settings=s, agents=[])
    ids = []
    for i in range(6):
        r = await api.http.post("/v1/tasks", json={"params": {**PARAMS, "seed": i}})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    env = {"SDFLEET_AGENT__DRAIN_S": "0.5", "SDFLEET_AGENT__PREFETCH": "4"}
    with agent_process(engine, fleet_file(tmp_path, s), "q", **env) as proc:
        # one finished, one running, the others received and waiting in the agent's pool
        await until(store, ids[0], lambda r: r.state is TaskState.SUCCEEDED)
        deadline = time.monotonic() + 30
        while not [r for r in [await store.get("default", i) for i in ids[1:]] if r and r.state is RUNNING]:
            assert time.monotonic() < deadline, "no task running after the first"
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    for task_id in ids[1:]:
        record = await store.get("default", task_id)
        assert record is not None and record.state in (TaskState.QUEUED, TaskState.SUCCEEDED), record
    quick = settings(engine, models_dir, latency_s=0.05)
    await start_fleet(QUEUE, settings=quick, agents=["q"], with_api=False)
    views = [await api.wait(task_id, timeout_s=60) for task_id in ids]
    assert [v["state"] for v in views] == ["succeeded"] * 6
    assert all(v["attempts"] <= 2 for v in views), [v["attempts"] for v in views]
    notes = [n for n in await drain(engine, "results") if n.get("task_id") in ids]
    assert sorted(n["task_id"] for n in notes) == sorted(ids), notes


async def test_cancel_reaches_a_running_task_within_seconds_whatever_the_lease(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    runtimes = {"synthetic": {"latency_s": 60, "progress_steps": 60}}
    s = fleet_settings(engine, models_dir, QUEUE, runtimes=runtimes, lease_s=120)
    fleet = await start_fleet(QUEUE, settings=s)
    r = await fleet.http.post("/v1/tasks", json={"params": PARAMS})
    task_id = r.json()["id"]
    await fleet.wait(task_id, states=("running",))
    await asyncio.sleep(1.0)
    cancelled = time.monotonic()
    assert (await fleet.http.post(f"/v1/tasks/{task_id}/cancel")).status_code == 200
    runtime = fleet.fleet.agents[0].parts.runtime
    while fleet.fleet.agents[0]._running:
        assert time.monotonic() - cancelled < 10, "the running task was not interrupted"
        await asyncio.sleep(0.05)
    # a heartbeat would have come only after lease_s / 3 = 40 s; the runtime stopped long before
    assert time.monotonic() - cancelled < 10
    assert getattr(runtime, "switches", 0) <= 1
    view = await fleet.wait(task_id)
    assert view["state"] == "cancelled"
    notes = [n for n in await drain(engine, "results") if n.get("task_id") == task_id]
    assert [n["type"] for n in notes] == ["cancelled"], notes


# On aws SQS rounds the lease up to whole seconds, which the old 1 s heartbeat raced: only sqlite and
# redis tell the old heartbeat from the new, and moto's slower calls would only add noise here.
@pytest.mark.parametrize("engine", ["sqlite", "redis"], indirect=True)
async def test_a_lease_shorter_than_the_run_is_kept_by_the_default_heartbeat(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The default heartbeat was a third of the lease but never under a second, so a lease of a
    second or less was extended only as (or after) it ran out: the delivery came back while its
    task ran (to the dead-letter queue once past ``max_receives``; CI caught it on redis). A third
    of the lease now, whatever the lease: the delivery is received once."""
    caplog.set_level(logging.INFO, logger="sdfleet.agent.task")
    runtimes = {"synthetic": {"latency_s": 3}}
    s = fleet_settings(engine, models_dir, QUEUE, runtimes=runtimes, lease_s=0.8, max_receives=2)
    fleet = await start_fleet(QUEUE, settings=s)
    task_id = (await fleet.http.post("/v1/tasks", json={"params": PARAMS})).json()["id"]
    view = await fleet.wait(task_id)
    assert view["state"] == "succeeded" and view["attempts"] == 1, view
    events = task_events(caplog, task_id)
    assert events == ["received", "started", "succeeded"], events  # never back while it ran
    q = await _settled(fleet)
    assert (q["visible"], q["in_flight"], q["dead_letters"]) == (0, 0, 0), q


async def test_a_delivery_that_comes_back_to_the_agent_running_it_does_not_run_again(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """A delivery whose lease lapsed while its task ran (here its heartbeat is made to come after
    the lease, as an event loop stalled past it would) came back to the same agent, whose record
    start took its own ``running`` for its own and ran the task a second time beside the first. The
    second delivery now waits in hand for the first and is dropped once the task has finished,
    without telling the subscribers again what the first just told them."""
    runtimes = {"synthetic": {"latency_s": 3}}
    s = fleet_settings(engine, models_dir, QUEUE, runtimes=runtimes, lease_s=1, max_receives=5)
    fleet = await start_fleet(QUEUE, settings=s)
    agent = fleet.fleet.agents[0]
    runs: list[str] = []
    inner = agent.parts.runtime.run

    async def run(job: Any, progress: Any) -> Any:
        runs.append(job.task_id)
        return await inner(job, progress)

    agent.parts.runtime.run = run  # type: ignore[method-assign]
    agent.period = 5.0  # the first delivery's lease (1 s) lapses before its first extension
    task_id = (await fleet.http.post("/v1/tasks", json={"params": PARAMS})).json()["id"]
    await fleet.wait(task_id, states=("running",))
    agent.period = s.fleet.retry.lease_s / 3  # the delivery that comes back keeps its lease
    view = await fleet.wait(task_id)
    assert view["state"] == "succeeded" and view["attempts"] == 1, view
    q = await _settled(fleet)
    assert (q["visible"], q["in_flight"], q["dead_letters"]) == (0, 0, 0), q
    assert runs == [task_id], runs
    notes = [n for n in await drain(engine, "results") if n.get("task_id") == task_id]
    assert [n["type"] for n in notes] == ["succeeded"], notes


async def test_two_copies_of_a_queued_task_received_together_run_once(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that submits an id again after a lease has the API publish it again (the first
    message may be lost); an agent that received both copies while its runtime was busy pooled
    both, and the second's start took the first's ``running`` for its own: the task ran twice at
    once. The second waits for the first now, and is dropped once the task has finished."""
    caplog.set_level(logging.INFO, logger="sdfleet.agent.task")
    runtimes = {"synthetic": {"latency_s": 0.5}}
    s = fleet_settings(
        engine, models_dir, QUEUE, runtimes=runtimes, lease_s=3, prefetch=8, prefetch_horizon_s=0
    )
    api = await start_fleet(QUEUE, settings=s, agents=[])
    body = {"id": "twice", "params": PARAMS}
    ahead = await submit_all(api, [{"params": PARAMS}] * 2)  # the runtime's two places, taken first
    assert (await api.http.post("/v1/tasks", json=body)).status_code == 202
    await asyncio.sleep(3.2)  # a lease (3 s: room for a loaded machine) later the same id is published again
    assert (await api.http.post("/v1/tasks", json=body)).status_code == 200
    assert (await _queue(api))["visible"] == 4
    await start_fleet(QUEUE, settings=s, with_api=False)  # one receive takes all: both copies pooled
    assert [(await api.wait(task_id))["state"] for task_id in ahead] == ["succeeded"] * 2
    view = await api.wait("twice")
    assert view["state"] == "succeeded" and view["attempts"] == 1, view
    q = await _settled(api)
    assert (q["visible"], q["in_flight"], q["dead_letters"]) == (0, 0, 0), q
    events = task_events(caplog, "twice")
    assert events.count("started") == 1, events
    assert events.count("dropped") == 1, events


@pytest.mark.parametrize("how", ["runs on", "fails", "shuts down"])
async def test_a_task_taken_over_after_a_lapsed_lease_has_one_result_from_the_agent_that_took_it(
    start_fleet: StartFleet,
    engine: Engine,
    models_dir: Path,
    store: TaskStore,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    """An agent whose lease on a running task lapsed (here its heartbeat comes after the lease, as
    a stalled event loop's would) while a second agent received the message again and took the
    task over went on as if the task were still its own: a failed run or a shutdown put the
    second agent's ``running`` back to ``queued``, whose result was then refused and its message
    acked (the task stayed queued for good); a run that went on ran to its end beside the other.
    Now the first agent's cancel watch sees the other's start and interrupts its run, and what
    ends it writes no record and leaves the delivery alone: one result, the second agent's."""
    caplog.set_level(logging.INFO, logger="sdfleet.agent.task")
    runtimes = {"synthetic": {"latency_s": 0.2}}
    # The first agent's watch looks every second where it is the point, else after the failure.
    check_s = 1.0 if how == "runs on" else 60.0
    agent = {"cancel_check_s": check_s, "drain_s": 0.5}  # a shutdown interrupts at once
    s = fleet_settings(engine, models_dir, QUEUE, runtimes=runtimes, lease_s=2, max_receives=5, **agent)
    api = await start_fleet(QUEUE, settings=s, agents=[])
    first = await start_fleet(QUEUE, settings=s, with_api=False)
    a = first.fleet.agents[0]
    a.period = 30.0  # its delivery's lease (2 s) lapses while it runs
    a.parts.runtime.latency_s = 30.0  # type: ignore[attr-defined]  # longer than the test waits
    receive, run = a.parts.bus.receive, a.parts.runtime.run
    received: list[Any] = []
    task_id = ""

    def taken_over() -> bool:
        return task_events(caplog, task_id).count("started") == 2

    def let_go() -> bool:
        return any("taken over by" in getattr(r, "reason", "") for r in caplog.records)

    async def receive_once(*args: Any, **kwargs: Any) -> Any:
        if received:  # it has the task: the message that comes back goes to the second agent
            await asyncio.sleep(0.2)
            return []
        received.extend(deliveries := await receive(*args, **kwargs))
        return deliveries

    async def run_or_fail(job: Any, progress: Any) -> Any:
        if how == "fails":
            await _until(taken_over)
            raise RuntimeFailure("the GPU fell off the bus")
        return await run(job, progress)

    a.parts.bus.receive = receive_once  # type: ignore[method-assign]
    a.parts.runtime.run = run_or_fail  # type: ignore[method-assign]
    task_id = (await api.http.post("/v1/tasks", json={"params": PARAMS})).json()["id"]
    await api.wait(task_id, states=("running",))
    # The second agent holds the task on a longer lease: on a loaded machine (moto, four test
    # workers on two cores) a 2 s one could lapse too, and a third delivery is another story.
    s_b = fleet_settings(engine, models_dir, QUEUE, runtimes=runtimes, lease_s=10, max_receives=5, **agent)
    second = await start_fleet(QUEUE, settings=s_b, with_api=False)
    b = second.fleet.agents[0]
    b_run = b.parts.runtime.run

    async def run_after_the_first_let_go(job: Any, progress: Any) -> Any:
        await _until(let_go)  # within about a second of this start, not at the end of a 30 s run
        return await b_run(job, progress)

    b.parts.runtime.run = run_after_the_first_let_go  # type: ignore[method-assign]
    if how == "shuts down":
        await _until(taken_over)
        await first.stop()  # its drain interrupts the run the second agent took over
    view = await api.wait(task_id, timeout_s=30)
    assert view["state"] == "succeeded", view
    record = await store.get("default", task_id)
    assert record is not None and record.worker == b.parts.worker_id, record
    dropped = [r for r in caplog.records if getattr(r, "event", "") == "dropped"]
    assert [r.reason for r in dropped] == [
        f"task {task_id} taken over by {b.parts.worker_id} after this agent's lease on it lapsed"
    ]
    events = task_events(caplog, task_id)
    assert sorted(events) == sorted(["received", "started"] * 2 + ["dropped", "succeeded"]), events
    q = await _settled(api)
    assert (q["visible"], q["in_flight"], q["dead_letters"]) == (0, 0, 0), q


async def _until(done: Any, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def _queue(fleet: Any) -> dict[str, Any]:
    (q,) = [v for v in (await fleet.http.get("/v1/queues")).json() if v["name"] == "q"]
    return q  # type: ignore[no-any-return]


async def _settled(fleet: Any, timeout_s: float = 10) -> dict[str, Any]:
    """Queue ``q``'s view once nothing is in flight (a delivery waiting in hand for a finished
    task is dropped just after it), or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (q := await _queue(fleet))["in_flight"] and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return q


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # the receiver's rule, not the engine's
async def test_deliveries_settled_without_a_run_free_their_room_at_once(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery that ends in prepare (an input that cannot be fetched, a drop) gave its pool room
    back only when the receiver next looked, a second later: a backlog of such tasks settled one
    per second (20 failed inputs took 19 s; the API's fuzzing run waited minutes on them). The
    receiver is woken at once; here its fallback look is an hour away, so only that wake-up can
    get the tasks through."""
    monkeypatch.setattr("sdfleet.agent.loop.Agent.ROOM_POLL_S", 3600.0)
    fleet = await start_fleet(QUEUE, runtimes={"synthetic": {"latency_s": 0}})
    unreachable = f"http://127.0.0.1:{free_port()}/in.png"
    bad = {"type": "image-to-image", "params": {**PARAMS, "init_images": [unreachable]}}
    ids = await submit_all(fleet, [bad] * 6 + [{"params": PARAMS}])
    views = [await fleet.wait(task_id, timeout_s=60) for task_id in ids]
    assert [v["error"]["code"] for v in views[:-1]] == ["input_fetch_failed"] * 6, views
    assert views[-1]["state"] == "succeeded", views[-1]


class SlowImage:
    """An input image that takes two seconds to arrive: a task's prepare stage, caught in the act."""

    def __init__(self) -> None:
        from sdfleet.demo import _input_image

        self.png = _input_image()
        self.asked = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.asked.set()
        await asyncio.sleep(2.0)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"image/png")]}
        )
        await send({"type": "http.response.body", "body": self.png})


async def test_a_task_still_being_prepared_at_sigterm_is_released_not_left_to_its_lease(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, tmp_path: Path
) -> None:
    s = fleet_settings(engine, models_dir, QUEUE, runtimes={"synthetic": {"latency_s": 0.05}}, lease_s=60)
    api = await start_fleet(QUEUE, settings=s, agents=[])
    slow = SlowImage()
    async with serving(slow) as url:
        body = {"type": "image-to-image", "params": {**PARAMS, "init_images": [f"{url}/in.png"]}}
        env = {"SDFLEET_AGENT__ALLOW_PRIVATE_INPUTS": "true"}
        with agent_process(engine, fleet_file(tmp_path, s), "q", **env) as proc:
            r = await api.http.post("/v1/tasks", json=body)
            assert r.status_code == 202, r.text
            await asyncio.wait_for(slow.asked.wait(), 60)  # received, its input on the way
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0
        # handed back as the agent stopped: visible now, not when its 60 s lease runs out
        q = await _queue(api)
        assert (q["visible"], q["in_flight"]) == (1, 0), q


@pytest.mark.parametrize(("horizon_s", "most_ahead"), [(3.9, 2), (0, 4)])
async def test_a_busy_agent_holds_no_more_long_tasks_than_it_starts_within_the_horizon(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, horizon_s: float, most_ahead: int
) -> None:
    """1 s tasks, prefetch 4, a runtime that holds a second job queued while one runs: with a
    3.9 s horizon the pool holds one task until the first call has ended, then two (three start
    within 3.9 s at the measured 1 s each, up to 1.3 s on a loaded machine, one of them the job
    queued at the runtime), and the rest stay on the queue for other agents; without a horizon (0)
    it holds four."""
    runtimes = {"synthetic": {"latency_s": 1.0}}
    s = fleet_settings(
        engine, models_dir, QUEUE, runtimes=runtimes, lease_s=60, prefetch=4, prefetch_horizon_s=horizon_s
    )
    fleet = await start_fleet(QUEUE, settings=s, agents=[])
    # 16: work left to hold once the measured pace allows two ahead, which takes a few calls
    # after a slow first one (2.1 s in two `make test-slow` runs: the average came down to 1.3 s
    # when 8 tasks had nearly all started)
    await submit_all(fleet, [{"params": {**PARAMS, "seed": i}} for i in range(16)])
    worker = await start_fleet(QUEUE, settings=s, agents=["q"], with_api=False)
    agent = worker.fleet.agents[0]
    held, leased, limits = [], [], []
    gauge = partial(
        agent.parts.metrics.registry.get_sample_value, "sdfleet_agent_prefetch_limit", {"queue": "q"}
    )
    # Three calls end in 3.6 s at 1 s each; on a loaded host they take longer, so the window
    # grows (up to 12 s) until the pool and the gauge (set a moment after the pool) have both
    # reached the most held ahead: watched longer, never allowed more than it.
    paces: list[float] = []
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < 3.6 or (
        min(max(held), max(limits)) < most_ahead and elapsed < 12
    ):
        held.append(len(agent.pool) + agent._preparing)
        leased.append((await _queue(fleet))["in_flight"])
        limits.append(gauge())
        if (pace := agent.pace.estimate()) is not None:
            paces.append(pace)
        await asyncio.sleep(0.03)
    assert max(held) == most_ahead, (held, paces)
    assert max(limits) == most_ahead, limits  # what operators see
    if horizon_s:
        assert held[: held.index(2)] and max(held[: held.index(2)]) == 1  # before the first call ended
        # at the runtime, held ahead, and at most one finishing: the rest is free for another agent
        assert max(leased) <= agent.depth + most_ahead + 1, leased
    else:
        assert max(leased) >= agent.depth + most_ahead, leased
