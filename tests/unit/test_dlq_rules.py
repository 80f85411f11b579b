"""What a redrive does with each kind of dead letter (``sdfleet.dlq``), on the SQLite bus and store:
letters made as the engine makes them (received ``max_receives`` times, never acked), the record
set to each state a letter's task can be in, and what reaches the queue again read back from it.
The SQLite engine answers a receive exactly, so the reads here do not wait for more letters."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sdfleet.bus import Bus, QueueSpec, Subscription, Topology, open_bus
from sdfleet.dlq import Outcome, held, redrive, settle
from sdfleet.errors import StoreError
from sdfleet.routing import ATTR_ENQUEUED_AT
from sdfleet.store import TaskStore, open_store
from sdfleet.tasks import Task, TaskError, TaskRecord, TaskState
from seed_payloads import V1ALPHA2_T2I

ATTRS = {"sd_model_checkpoint": "sd15.safetensors", "tenant_tier": "gold", ATTR_ENQUEUED_AT: "1.0"}


@pytest.fixture
async def engines(tmp_path: Path) -> AsyncIterator[tuple[Bus, TaskStore]]:
    url = f"sqlite:///{tmp_path}/fleet.db"
    bus, store = open_bus(url), open_store(url)
    topology = Topology(
        topics=["tasks"],
        queues=[QueueSpec(name="q", max_receives=1)],
        subscriptions=[Subscription(topic="tasks", queue="q")],
    )
    await bus.ensure(topology)
    try:
        yield bus, store
    finally:
        await bus.aclose()
        await store.aclose()


async def dead_letter(bus: Bus, body: bytes) -> None:
    """Publish ``body`` and receive it past ``max_receives``: the engine moves it to ``q-dlq``."""
    before = (await bus.stats("q")).dead_letters
    await bus.publish("tasks", body, ATTRS)
    (d,) = await bus.receive("q", lease_s=30)
    await bus.release(d)
    assert await bus.receive("q") == []
    assert (await bus.stats("q")).dead_letters == before + 1


async def record(store: TaskStore, task: Task, state: TaskState, run: int | None = None) -> None:
    """``task``'s record in ``state`` (of run ``run``, default the task's own)."""
    stored = task.model_copy(update={"run": run or task.run})
    error = TaskError(code="runtime_failure", message="boom") if state is TaskState.FAILED else None
    await store.create(TaskRecord(task=stored, state=state, attempts=3, error=error))


async def redriven(bus: Bus, store: TaskStore) -> tuple[Outcome, str, int | None]:
    async with held(bus, store, ["q"], limit=10, wait_s=0) as read:
        (letter,) = read.letters
        done = await redrive(bus, store, "tasks", letter)
    return done.outcome, done.reason, done.run


async def requeued(bus: Bus) -> tuple[Task, dict[str, str]]:
    (d,) = await bus.receive("q", lease_s=30)
    return Task.model_validate_json(d.body), dict(d.attributes)


TASK = Task.model_validate({"params": {"prompt": "a lighthouse"}, "model": "sd15.safetensors"})


async def test_a_failed_task_runs_its_next_run_and_its_record_reopens(engines: tuple[Bus, TaskStore]) -> None:
    bus, store = engines
    await dead_letter(bus, TASK.to_message())
    await record(store, TASK, TaskState.FAILED)
    assert await redriven(bus, store) == (Outcome.RERUN, "failed: run 2 published", 2)
    task, attrs = await requeued(bus)
    assert task.id == TASK.id and task.run == 2 and task.params == TASK.params
    assert {k: v for k, v in attrs.items() if k != ATTR_ENQUEUED_AT} == {
        k: v for k, v in ATTRS.items() if k != ATTR_ENQUEUED_AT
    }, "routed as it was first published"
    assert float(attrs[ATTR_ENQUEUED_AT]) > 1.0, "a new enqueue time: the queue wait counts from now"
    reopened = await store.get(TASK.tenant, TASK.id)
    assert reopened is not None and reopened.state is TaskState.QUEUED and reopened.task.run == 2
    assert reopened.attempts == 0 and reopened.error is None
    assert (await bus.stats("q")).dead_letters == 0


@pytest.mark.parametrize("state", [TaskState.QUEUED, TaskState.RUNNING])
async def test_a_task_its_agents_never_finished_is_sent_as_it_was(
    engines: tuple[Bus, TaskStore], state: TaskState
) -> None:
    bus, store = engines
    await dead_letter(bus, TASK.to_message())
    await record(store, TASK, state)
    outcome, reason, run = await redriven(bus, store)
    assert (outcome, run) == (Outcome.SENT, 1) and f"still {state}" in reason
    task, _ = await requeued(bus)
    assert task.run == 1
    kept = await store.get(TASK.tenant, TASK.id)
    assert kept is not None and kept.state is state, "the agent that receives it takes it over"


async def test_a_task_never_recorded_is_sent_as_it_was(engines: tuple[Bus, TaskStore]) -> None:
    bus, store = engines
    await dead_letter(bus, TASK.to_message())
    assert await redriven(bus, store) == (Outcome.SENT, "no record: published again as it is", 1)
    assert (await requeued(bus))[0].id == TASK.id


@pytest.mark.parametrize(
    ("state", "run", "reason"),
    [
        (TaskState.SUCCEEDED, None, "the task succeeded: nothing to run"),
        (TaskState.CANCELLED, None, "the task cancelled: nothing to run"),
        (TaskState.QUEUED, 2, "run 2 came after it (now queued)"),
        (TaskState.FAILED, 2, "run 2 came after it (now failed)"),
    ],
)
async def test_a_finished_or_later_run_drops_the_letter(
    engines: tuple[Bus, TaskStore], state: TaskState, run: int | None, reason: str
) -> None:
    bus, store = engines
    await dead_letter(bus, TASK.to_message())
    await record(store, TASK, state, run)
    assert await redriven(bus, store) == (Outcome.DROPPED, reason, None)
    assert await bus.receive("q") == [], "nothing published"
    assert (await bus.stats("q")).dead_letters == 0, "the letter is deleted"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (json.dumps(V1ALPHA2_T2I["task"]).encode(), "a seed message (its run is its SNS publish)"),
        (b"\x00not json", "body is not JSON"),
        (b'{"schema": 1, "params": {"steps": "many"}}', "not a valid task"),
    ],
    ids=["seed", "not-json", "invalid"],
)
async def test_a_letter_that_is_not_our_task_is_kept(
    engines: tuple[Bus, TaskStore], body: bytes, why: str
) -> None:
    bus, store = engines
    await dead_letter(bus, body)
    async with held(bus, store, ["q"], limit=10, wait_s=0) as read:
        (letter,) = read.letters
        assert letter.view.unreadable is not None and why in letter.view.unreadable
        done = await redrive(bus, store, "tasks", letter)
    assert done.outcome is Outcome.KEPT and why in done.reason
    assert await bus.receive("q") == []
    assert (await bus.stats("q")).dead_letters == 1, "given back"


async def test_a_read_holds_each_letter_once_and_gives_them_back(engines: tuple[Bus, TaskStore]) -> None:
    bus, store = engines
    tasks = [Task.model_validate({"params": {"prompt": f"p{i}"}}) for i in range(12)]
    for task in tasks:
        await dead_letter(bus, task.to_message())
    async with held(bus, store, ["q"], limit=11, wait_s=0) as first:
        assert len({x.view.task_id for x in first.letters}) == 11, "more than one receive's 10, none twice"
        async with held(bus, store, ["q"], limit=50, wait_s=0) as second:
            (other,) = second.letters  # a second reader sees only what the first does not hold
            assert other.view.task_id not in {x.view.task_id for x in first.letters}
    async with held(bus, store, ["q"], limit=50, wait_s=0) as again:
        assert sorted(x.view.task_id or "" for x in again.letters) == sorted(t.id for t in tasks)


class CrashAt:
    """Wraps a bus or store; ``method`` raises once, as if the process died there."""

    def __init__(self, inner: object, method: str) -> None:
        self.inner, self.method, self.crashed = inner, method, False

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.inner, name)
        if name != self.method or self.crashed:
            return attr

        async def crash(*args: object, **kwargs: object) -> object:
            self.crashed = True
            raise StoreError("the process died here")

        return crash


@pytest.mark.parametrize("where", ["before the reopen", "before the delete"])
async def test_a_redrive_that_dies_half_way_is_finished_by_the_next_as_the_same_run(
    engines: tuple[Bus, TaskStore], where: str
) -> None:
    """Published first, deleted last: whatever a redrive did before it died, the next one leaves
    one run 2 to run, and no run 3."""
    bus, store = engines
    await dead_letter(bus, TASK.to_message())
    await record(store, TASK, TaskState.FAILED)
    dying_bus: Any = CrashAt(bus, "ack") if where == "before the delete" else bus
    dying_store: Any = CrashAt(store, "compare_and_set") if where == "before the reopen" else store
    async with held(dying_bus, dying_store, ["q"], limit=10, wait_s=0) as read:
        (letter,) = read.letters
        with pytest.raises(StoreError):
            await redrive(dying_bus, dying_store, "tasks", letter)
    assert (await bus.stats("q")).dead_letters == 1, "the letter is still there"
    outcome, _, _ = await redriven(bus, store)
    assert outcome is (Outcome.RERUN if where == "before the reopen" else Outcome.DROPPED)
    published = [Task.model_validate_json(d.body).run for d in await bus.receive("q", max_messages=10)]
    assert published == ([2, 2] if where == "before the reopen" else [2]), "the agents run run 2 once"
    reopened = await store.get(TASK.tenant, TASK.id)
    assert reopened is not None and reopened.task.run == 2 and reopened.state is TaskState.QUEUED
    assert (await bus.stats("q")).dead_letters == 0


async def test_one_letter_that_cannot_be_settled_is_kept_and_the_others_go_on(
    engines: tuple[Bus, TaskStore],
) -> None:
    """A store that refuses one write (an outage, a throttled table) keeps that letter, with the
    error, and the redrive goes on with the next."""
    bus, store = engines
    first, second = (Task.model_validate({"params": {"prompt": p}}) for p in ("a", "b"))
    for task in (first, second):
        await dead_letter(bus, task.to_message())
        await record(store, task, TaskState.FAILED)
    dying: Any = CrashAt(store, "compare_and_set")  # the first reopen fails, the next ones pass
    async with held(bus, dying, ["q"], limit=10, wait_s=0) as read:
        done = [await settle(x, lambda x: redrive(bus, dying, "tasks", x)) for x in read.letters]
    assert [d.outcome for d in done] == [Outcome.KEPT, Outcome.RERUN]
    assert done[0].reason == "not settled: the process died here"
    assert (await bus.stats("q")).dead_letters == 1, "the kept letter is back"
