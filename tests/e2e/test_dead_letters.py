"""A task whose agents stopped on each try ends ``failed`` (``dead_lettered``), and its subscribers
are told, on every engine; its letter stays for ``sdfleet dlq redrive``.

Before, a message that ran out of receives with no outcome (every agent that took it was killed,
or its receives were lost on the way) left its record ``queued`` or ``running`` for good: the client
polled, and its webhook or results subscriber waited, for ever.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from fleet_tools import agent_process, drain, write_fleet_file
from test_dlq import listed, sdfleet

from conftest import Engine, RunningFleet, StartFleet, fleet_settings
from sdfleet.bus import open_bus
from sdfleet.settings import QueueConfig, Settings
from sdfleet.store import TaskStore
from sdfleet.tasks import TaskRecord, TaskState

pytestmark = pytest.mark.timeout(180)

TASK = {"params": {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64}}
CHECK = {"SDFLEET_AGENT__DEAD_LETTER_CHECK_S": "0.3"}


async def record_of(store: TaskStore, task_id: str) -> TaskRecord:
    record = await store.get("default", task_id)
    assert record is not None
    return record


async def notes_of(engine: Engine, task_id: str) -> list[dict[str, Any]]:
    return [n for n in await drain(engine, "results") if n.get("task_id") == task_id]


async def test_a_task_that_kills_its_agent_on_each_try_fails_and_is_told(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, tmp_path: Path, store: TaskStore
) -> None:
    """Its runtime takes the agent's process down on each run (killed for memory, a crash in
    native code); the agent that takes the next receive finds it in the dead-letter queue."""
    poison = tmp_path / "poison"
    poison.touch()
    queue = [QueueConfig(name="q", runtime="fakes.runtimes:KillsItsAgent")]
    runtimes = {"fakes.runtimes:KillsItsAgent": {"kill_while": str(poison)}}
    settings = fleet_settings(engine, models_dir, queue, runtimes=runtimes, max_receives=2, lease_s=2)
    fleet = await start_fleet(queue, settings=settings, agents=[])
    config = write_fleet_file(tmp_path / "sdfleet.yaml", settings.fleet.model_dump(mode="json"))
    r = await fleet.http.post("/v1/tasks", json=TASK)
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]

    for attempt in (1, 2):
        with agent_process(engine, config, "q", **CHECK) as proc:
            code = await asyncio.to_thread(proc.wait, 60)
        assert code == -9, f"try {attempt}: the runtime did not take its agent down ({code})"
        record = await record_of(store, task_id)
        assert record.state is TaskState.RUNNING and record.attempts == attempt, record

    with agent_process(engine, config, "q", **CHECK) as proc:
        view = await fleet.wait(task_id, timeout_s=60)
        assert proc.poll() is None, "the third agent serves on"
        # told after the record is written: read while it serves on (a kill right after the
        # record, before the publish, lost the note once on a loaded machine)
        ends = [n for n in await notes_of(engine, task_id) if n["type"] != "started"]
    assert view["state"] == "failed" and view["attempts"] == 2 and view["run"] == 1, view
    assert view["error"]["code"] == "dead_lettered", view
    assert view["error"]["message"].startswith("no agent finished it in 2 tries"), view
    assert [(n["type"], n["error"]["code"], n["run"]) for n in ends] == [("failed", "dead_lettered", 1)], ends

    poison.unlink()  # the fix is deployed
    # The letter is back from the killed agent's last look (it holds letters while it reads them).
    (letter,) = await listed(engine, config, want=1)
    assert letter["task_id"] == task_id and letter["error"]["code"] == "dead_lettered", letter
    result = await sdfleet(engine, config, "dlq", "redrive", "--json")
    assert result.exit_code == 0, result.output
    (done,) = json.loads(result.stdout)["settled"]
    assert done["outcome"] == "rerun" and done["run"] == 2, done
    assert done["letter"]["state"] == "failed" and done["letter"]["error"]["code"] == "dead_lettered", done
    with agent_process(engine, config, "q", **CHECK):
        view = await fleet.wait(task_id, timeout_s=60, states=("succeeded",))
    assert view["run"] == 2 and view["attempts"] == 1 and len(view["images"]) == 1, view


async def test_lost_receives_fail_a_task_but_not_one_submitted_again(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, store: TaskStore
) -> None:
    """Receives whose replies were lost (here: taken and never settled, as a client that lost the
    reply leaves them) use up a message's tries before any agent saw it. A client that submitted
    the same id again meanwhile got a second copy published: that copy runs, and the first one's
    letter does not fail it."""
    queue = [QueueConfig(name="q", runtime="synthetic")]
    settings = fleet_settings(
        engine, models_dir, queue, runtimes={"synthetic": {"latency_s": 0.5}}, max_receives=2, lease_s=1
    )
    api = await start_fleet(queue, settings=settings, agents=[])
    lost, again = "lost-1", "again-1"
    for task_id in (lost, again):
        r = await api.http.post("/v1/tasks", json={"id": task_id, **TASK})
        assert r.status_code == 202, r.text
    await _lose_receives(engine, settings, want=2)
    r = await api.http.post("/v1/tasks", json={"id": again, **TASK})
    assert r.status_code in (200, 202), r.text
    assert (await record_of(store, again)).published_at is not None

    agent = await _agent(start_fleet, settings)
    view = await api.wait(lost, timeout_s=60)
    assert view["state"] == "failed" and view["error"]["code"] == "dead_lettered", view
    assert view["attempts"] == 0, "no agent started it"
    view = await api.wait(again, timeout_s=60)
    assert view["state"] == "succeeded" and view["run"] == 1, view
    notes = await notes_of(engine, lost)
    assert [(n["type"], n["error"]["code"]) for n in notes] == [("failed", "dead_lettered")], notes
    assert agent.fleet.agents[0].processed >= 1


async def _lose_receives(engine: Engine, settings: Settings, *, want: int) -> None:
    """Take every message of ``q`` ``max_receives`` times without settling it, then once more,
    which moves it to the dead-letter queue; wait until ``want`` letters are there."""
    bus = open_bus(engine.bus_url)
    lease_s = settings.fleet.retry.lease_s
    try:
        deadline = time.monotonic() + 60
        while (await bus.stats("q")).dead_letters < want:
            assert time.monotonic() < deadline, await bus.stats("q")
            await bus.receive("q", max_messages=10, wait_s=0.5, lease_s=lease_s)
            await asyncio.sleep(lease_s / 2)
    finally:
        await bus.aclose()


async def _agent(start_fleet: StartFleet, settings: Settings) -> RunningFleet:
    agent = settings.agent.model_copy(update={"dead_letter_check_s": 0.3})
    queue = settings.fleet.queues
    return await start_fleet(queue, settings=settings.model_copy(update={"agent": agent}), with_api=False)
