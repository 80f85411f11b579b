"""``sdfleet dlq list`` and ``sdfleet dlq redrive`` on every engine, through the whole fleet: a task
that failed on each try reaches the dead-letter queue; once the fault is fixed, a redrive runs it
again and it succeeds. Sending the letter back as it was would do nothing: an agent drops a
delivery of a finished task, so the redrive publishes the task's next run and reopens its record."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from fleet_tools import drain
from typer.testing import CliRunner, Result

from conftest import Engine, RunningFleet, StartFleet, fleet_settings
from sdfleet.bus import open_bus
from sdfleet.cli import app
from sdfleet.settings import FleetConfig, QueueConfig
from sdfleet.store import TaskStore

pytestmark = pytest.mark.timeout(180)

QUEUE = [QueueConfig(name="q", runtime="fakes.runtimes:FailsUntilFixed")]
TASK = {"params": {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64}}


async def sdfleet(engine: Engine, config: Path, *args: str) -> Result:
    """``sdfleet ARGS -c CONFIG`` on the test's engines, in a thread (the command runs its own loop)."""
    env = {**engine.env(), "SDFLEET_LOG_JSON": "false"}
    return await asyncio.to_thread(CliRunner().invoke, app, [*args, "-c", str(config)], env=env)


async def listed(engine: Engine, config: Path, want: int, timeout_s: float = 60) -> list[dict[str, Any]]:
    """``sdfleet dlq list --json`` once it shows ``want`` letters (an engine moves a message to the
    dead-letter queue on the receive after its last try)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = await sdfleet(engine, config, "dlq", "list", "--json")
        assert result.exit_code == 0, result.output
        letters: list[dict[str, Any]] = json.loads(result.stdout)
        if len(letters) >= want or loop.time() > deadline:
            return letters
        await asyncio.sleep(0.5)


async def dead_letter_gauge(fleet: RunningFleet) -> float:
    """``sdfleet_queue_dead_letters{queue="q"}`` as the API reports it after reading the queues."""
    assert (await fleet.http.get("/v1/queues")).status_code == 200  # refreshes the queue gauges
    text = (await fleet.http.get("/metrics")).text
    (line,) = [x for x in text.splitlines() if x.startswith('sdfleet_queue_dead_letters{queue="q"}')]
    return float(line.split()[-1])


async def start(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, tmp_path: Path
) -> tuple[RunningFleet, Path]:
    settings = fleet_settings(engine, models_dir, QUEUE, max_receives=2, lease_s=2)
    fleet = await start_fleet(QUEUE, settings=settings)
    config = tmp_path / "sdfleet.yaml"
    config.write_text(settings.fleet.model_dump_json())
    return fleet, config


async def test_a_dead_lettered_task_runs_again_once_its_fault_is_fixed(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, tmp_path: Path, store: TaskStore
) -> None:
    fleet, config = await start(start_fleet, engine, models_dir, tmp_path)
    runtime = fleet.fleet.agents[0].parts.runtime
    r = await fleet.http.post("/v1/tasks", json=TASK)
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    view = await fleet.wait(task_id, timeout_s=60)
    assert view["state"] == "failed" and view["attempts"] == 2, view

    (letter,) = await listed(engine, config, want=1)
    assert letter["queue"] == "q" and letter["task_id"] == task_id and letter["run"] == 1, letter
    assert letter["state"] == "failed" and letter["record_run"] == 1, letter
    assert letter["error"]["code"] == "runtime_failure", letter
    assert "out of memory" in letter["error"]["message"], letter
    text = await sdfleet(engine, config, "dlq", "list")  # the person's view: one row, the error
    assert text.exit_code == 0 and task_id in text.stdout and "out of memory" in text.stdout, text.output
    assert await listed(engine, config, want=1) == [letter], "a list changes nothing"
    assert await dead_letter_gauge(fleet) == 1.0

    runtime.broken = False  # the fix is deployed
    result = await sdfleet(engine, config, "dlq", "redrive", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (done,) = report["settled"]
    assert done["outcome"] == "rerun" and done["run"] == 2 and done["letter"]["task_id"] == task_id, done
    assert report["missing"] == [] and report["left"] == {"q": 0}, report

    view = await fleet.wait(task_id, timeout_s=60)
    assert view["state"] == "succeeded" and view["run"] == 2 and view["attempts"] == 1, view
    assert view["error"] is None, view
    assert len(view["images"]) == 1, view
    assert runtime.runs == 3, "two failed tries, then the redriven run"
    notes = [n for n in await drain(engine, "results") if n.get("task_id") == task_id]
    assert [(n["type"], n["run"]) for n in notes] == [("failed", 1), ("succeeded", 2)], notes
    record = await store.get("default", task_id)
    assert record is not None and record.task.run == 2 and record.state == "succeeded", record
    assert await listed(engine, config, want=0) == []
    assert await dead_letter_gauge(fleet) == 0.0
    again = await sdfleet(engine, config, "dlq", "redrive", "--task", task_id)
    assert again.exit_code == 1, again.output
    assert f"{task_id}: not among the dead letters read" in again.stdout, again.output


async def test_redrive_of_chosen_tasks_leaves_the_others(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, tmp_path: Path
) -> None:
    fleet, config = await start(start_fleet, engine, models_dir, tmp_path)
    runtime = fleet.fleet.agents[0].parts.runtime
    ids = []
    for _ in range(2):
        r = await fleet.http.post("/v1/tasks", json=TASK)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    for task_id in ids:
        assert (await fleet.wait(task_id, timeout_s=60))["state"] == "failed"
    assert sorted(x["task_id"] for x in await listed(engine, config, want=2)) == sorted(ids)

    runtime.broken = False
    result = await sdfleet(engine, config, "dlq", "redrive", "q", "--task", ids[0])
    assert result.exit_code == 0, result.output
    assert ids[0] in result.stdout and "rerun" in result.stdout, result.output
    assert "still in the dead-letter queues: q 1" in result.stdout, result.output
    assert (await fleet.wait(ids[0], timeout_s=60))["state"] == "succeeded"
    (left,) = await listed(engine, config, want=1)
    assert left["task_id"] == ids[1] and left["state"] == "failed", left
    assert (await fleet.http.get(f"/v1/tasks/{ids[1]}")).json()["state"] == "failed"

    unknown = await sdfleet(engine, config, "dlq", "list", "nope")
    assert unknown.exit_code == 2 and "no queue 'nope' in the fleet (its queues: q)" in unknown.output


async def test_a_letter_that_is_not_a_task_is_kept(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, tmp_path: Path
) -> None:
    fleet, config = await start(start_fleet, engine, models_dir, tmp_path)
    bus = open_bus(engine.bus_url)
    try:  # a message no agent can read: dead-lettered by the agents' receives
        await bus.publish(fleet.settings.fleet.tasks_topic, b"not json", {})
    finally:
        await bus.aclose()
    (letter,) = await listed(engine, config, want=1)
    assert letter["task_id"] is None and "not JSON" in letter["unreadable"], letter
    result = await sdfleet(engine, config, "dlq", "redrive", "--json")
    assert result.exit_code == 1, result.output
    (done,) = json.loads(result.stdout)["settled"]
    assert done["outcome"] == "kept" and "not JSON" in done["reason"], done
    assert await listed(engine, config, want=1) == [letter]

    refused = await sdfleet(engine, config, "dlq", "drop")
    assert refused.exit_code == 2 and "name the letters to drop with --id" in refused.output
    dropped = await sdfleet(engine, config, "dlq", "drop", "--id", letter["message_id"], "--json")
    assert dropped.exit_code == 0, dropped.output
    (done,) = json.loads(dropped.stdout)["settled"]
    assert done["outcome"] == "dropped" and done["letter"]["message_id"] == letter["message_id"], done
    assert await listed(engine, config, want=0) == []


async def test_a_queue_sdfleet_did_not_make_is_said_and_left(moto_url: str, tmp_path: Path) -> None:
    """The seed's queue, attached by URL (drop-in mode), has no dead-letter queue of sdfleet's:
    the command says so and reads the others."""
    import boto3

    ns = f"d{uuid.uuid4().hex[:8]}"
    seed_url = boto3.client("sqs", region_name="us-east-1").create_queue(QueueName=f"{ns}-seed")["QueueUrl"]
    url = f"aws://?prefix={ns}-&region=us-east-1&queue.sdruntime={seed_url}"
    engine = Engine("aws", url, url, f"s3://{ns}-out/results?create=true&region=us-east-1")
    queues = [
        QueueConfig(name="sdruntime", runtime="synthetic", filter={"tenant_tier": ["seed"]}),
        QueueConfig(name="q", runtime="synthetic"),
    ]
    fleet = FleetConfig(queues=queues)
    config = tmp_path / "sdfleet.yaml"
    config.write_text(fleet.model_dump_json())
    ensure = await sdfleet(engine, config, "ensure", "--wait", "0")
    assert ensure.exit_code == 0, ensure.output
    result = await sdfleet(engine, config, "dlq", "list", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    assert "queue sdruntime not read: it has no dead-letter queue" in result.stderr, result.output
    assert "queue q not read" not in result.stderr
