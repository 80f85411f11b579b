"""``ttl_s``: a task that has not started within it of its submit never runs; it ends ``failed``
with code ``ttl_expired`` and its subscribers are told, on every engine. Past a burst, a fleet
that scaled up late spends no GPU time on images nobody waits for any more."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from fleet_tools import receive_json, task_events

from conftest import Engine, RunningFleet, StartFleet, fleet_settings
from sdfleet.settings import QueueConfig
from seed_payloads import V1ALPHA2_T2I, copy_of

pytestmark = pytest.mark.timeout(120)

PARAMS = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3}


def _expired_unrun(view: dict[str, Any]) -> None:
    assert view["state"] == "failed" and view["error"]["code"] == "ttl_expired", view
    assert "ttl_s of 1 s" in view["error"]["message"], view["error"]
    assert view["attempts"] == 0 and view["started_at"] is None and view["images"] == [], view


def _ttl_expired_total(fleet: RunningFleet) -> float | None:
    registry = fleet.fleet.agents[0].parts.metrics.registry
    return registry.get_sample_value("sdfleet_tasks_ttl_expired_total", {"queue": "q"})


async def test_tasks_past_their_ttl_are_failed_unrun_and_told(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No agent while the tasks wait (a fleet scaled to zero, its first node still starting): the
    one that comes expires those past their ttl_s: the task's own, else the queue's (a seed-format
    task's too), and runs the one whose own ttl_s is longer."""
    caplog.set_level(logging.INFO, logger="sdfleet.agent.task")
    queues = [QueueConfig(name="q", runtime="synthetic", ttl_s=1)]
    settings = fleet_settings(engine, models_dir, queues, runtimes={"synthetic": {"latency_s": 0}})
    api = await start_fleet(queues, agents=[], settings=settings)
    for bad in (0, -1, 86_401, "soon"):
        r = await api.http.post("/v1/tasks", json={"params": PARAMS, "ttl_s": bad})
        assert r.status_code == 422 and "ttl_s" in r.text, (bad, r.text)
    late = await api.http.post("/v1/tasks", json={"id": "late", "params": PARAMS})
    own = await api.http.post("/v1/tasks", json={"id": "own", "params": PARAMS, "ttl_s": 3600})
    short = await api.http.post("/v1/tasks", json={"id": "short", "params": PARAMS, "ttl_s": 1})
    seed = copy_of(V1ALPHA2_T2I)
    seed["task"]["content"].update(width=64, height=64, steps=2)
    answers = [late, own, short, await api.http.post("/v1alpha2/", json=seed)]
    assert [r.status_code for r in answers] == [202, 202, 202, 200], [r.text for r in answers]
    assert [r.json()["ttl_s"] for r in answers[:3]] == [1, 3600, 1]  # the queue's, else its own
    await asyncio.sleep(1.5)
    agent = await start_fleet(queues, with_api=False, settings=settings)
    assert (await api.wait("own"))["state"] == "succeeded"
    for task_id in ("late", "short", "test-t2i"):
        _expired_unrun(await api.wait(task_id))
        assert task_events(caplog, task_id) == ["ttl_expired"]  # dropped before it was received
    # counted once `fail` is back, after the record the waits above saw (and the notice) is written
    deadline = asyncio.get_running_loop().time() + 10
    while _ttl_expired_total(agent) != 3.0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert _ttl_expired_total(agent) == 3.0
    events = await receive_json(engine, "results", 4)
    told = {(e.get("task_id"), e.get("type")) for e in events}
    assert {("late", "failed"), ("short", "failed"), ("own", "succeeded")} <= told, events
    assert not {("late", "started"), ("short", "started")} & told, events


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # the agent's own stage; any engine
async def test_a_task_that_waits_in_the_agent_past_its_ttl_does_not_start(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Received and prepared in time, it waits behind higher-priority tasks that hold the runtime
    for longer than its ttl_s: the run stage fails it instead of starting it."""
    caplog.set_level(logging.INFO, logger="sdfleet.agent.task")
    queues = [QueueConfig(name="q", runtime="synthetic")]
    # No prefetch horizon: the agent takes all four in at once, however long each runs.
    runtimes = {"synthetic": {"latency_s": 2.5}}
    settings = fleet_settings(engine, models_dir, queues, runtimes=runtimes, prefetch_horizon_s=0)
    fleet = await start_fleet(queues, settings=settings)
    bodies: list[dict[str, Any]] = [
        {"id": "first", "params": PARAMS, "priority": 9},
        {"id": "second", "params": PARAMS, "priority": 9},
        {"id": "third", "params": PARAMS, "priority": 9},
        {"id": "waits", "params": PARAMS, "ttl_s": 1},
    ]
    for body in bodies:
        assert (await fleet.http.post("/v1/tasks", json=body)).status_code == 202
    _expired_unrun(await fleet.wait("waits"))
    assert task_events(caplog, "waits") == ["received", "ttl_expired"]
    for task_id in ("first", "second", "third"):
        assert (await fleet.wait(task_id))["state"] == "succeeded"
    assert _ttl_expired_total(fleet) == 1.0


async def test_a_seed_ids_next_run_has_a_ttl_of_its_own(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """A seed id sent again after its ttl_s runs again: the next run's window starts at its own
    submit, not the id's first (``created_at``, which stays the first for listings)."""
    # 10 s: each run must be received within it, which a loaded host (moto, 4 test processes)
    # once did not do in 2 s, and once in 5 s (the first run, 6 s after its submit)
    queues = [QueueConfig(name="q", runtime="synthetic", ttl_s=10)]
    settings = fleet_settings(engine, models_dir, queues, runtimes={"synthetic": {"latency_s": 0}})
    fleet = await start_fleet(queues, settings=settings)
    body = copy_of(V1ALPHA2_T2I)
    body["task"]["metadata"]["id"] = "again"
    body["task"]["content"].update(width=64, height=64, steps=2)
    assert (await fleet.http.post("/v1alpha2/", json=body)).status_code == 200
    first = await fleet.wait("again")
    assert first["state"] == "succeeded" and first["run"] == 1, first
    await asyncio.sleep(10.5)  # the id's first submit is now past the queue's ttl_s
    assert (await fleet.http.post("/v1alpha2/", json=body)).status_code == 200
    for _ in range(300):
        view = (await fleet.http.get("/v1/tasks/again")).json()
        if view["run"] == 2 and view["finished_at"] is not None:
            break
        await asyncio.sleep(0.1)
    assert view["run"] == 2 and view["state"] == "succeeded", view
    assert view["created_at"] == first["created_at"]
