"""TaskStore contract: every backend in ``store_fixtures.STORE_FACTORIES`` passes these unchanged."""

from __future__ import annotations

import asyncio

import pytest
import store_fixtures

from sdfleet.errors import NotFound, TransitionConflict
from sdfleet.store.base import TaskStore, reopened, transition
from sdfleet.tasks import Task, TaskRecord, TaskResult, TaskState, new_task_id

store = store_fixtures.store  # the fixture, parametrised over every backend
set_state, tenant_name = store_fixtures.set_state, store_fixtures.tenant_name


def make_record(tenant: str = "default", created_at: float | None = None) -> TaskRecord:
    task = Task(tenant=tenant)
    if created_at is not None:
        task.created_at = created_at
    return TaskRecord(task=task)


async def test_create_and_get(store: TaskStore) -> None:
    rec = make_record(tenant_name())
    rec.task.params.prompt = "a lighthouse at dusk"
    stored, created = await store.create(rec)
    assert created
    assert stored == rec
    got = await store.get(rec.tenant, rec.id)
    assert got == rec
    assert got is not None and got.task.params.prompt == "a lighthouse at dusk"
    assert await store.get(rec.tenant, new_task_id()) is None


async def test_create_existing_id_returns_existing(store: TaskStore) -> None:
    first = make_record(tenant_name())
    await store.create(first)
    again = first.model_copy(deep=True)
    again.task.params.prompt = "something else"
    stored, created = await store.create(again)
    assert not created
    assert stored == first
    assert (await store.get(first.tenant, first.id)) == first


async def test_lifecycle_bumps_version(store: TaskStore) -> None:
    rec = make_record(tenant_name())
    await store.create(rec)
    running = await transition(
        store, rec.tenant, rec.id, set_state(TaskState.RUNNING, worker="w1", attempts=1)
    )
    assert (running.state, running.version, running.worker) == (TaskState.RUNNING, 1, "w1")
    result = TaskResult(images=["a/b-0.png"], seed=42)
    done = await transition(
        store, rec.tenant, rec.id, set_state(TaskState.SUCCEEDED, result=result, progress=1.0)
    )
    assert (done.state, done.version) == (TaskState.SUCCEEDED, 2)
    got = await store.get(rec.tenant, rec.id)
    assert got == done
    assert got is not None and got.result == result and got.attempts == 1


async def test_retry_moves_running_back_to_queued(store: TaskStore) -> None:
    rec = make_record(tenant_name())
    await store.create(rec)
    await transition(store, rec.tenant, rec.id, set_state(TaskState.RUNNING, attempts=1))
    back = await transition(store, rec.tenant, rec.id, set_state(TaskState.QUEUED))
    assert (back.state, back.version, back.attempts) == (TaskState.QUEUED, 2, 1)


@pytest.mark.parametrize("terminal", [TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED])
async def test_terminal_record_refuses_transitions(store: TaskStore, terminal: TaskState) -> None:
    rec = make_record(tenant_name())
    await store.create(rec)
    await transition(store, rec.tenant, rec.id, set_state(TaskState.RUNNING))
    final = await transition(store, rec.tenant, rec.id, set_state(terminal))
    for target in (TaskState.RUNNING, TaskState.QUEUED, terminal):
        with pytest.raises(TransitionConflict):
            await transition(store, rec.tenant, rec.id, set_state(target))
    assert (await store.get(rec.tenant, rec.id)) == final


async def test_illegal_move_refused(store: TaskStore) -> None:
    rec = make_record(tenant_name())
    await store.create(rec)
    with pytest.raises(TransitionConflict):
        await transition(store, rec.tenant, rec.id, set_state(TaskState.SUCCEEDED))
    assert (await store.get(rec.tenant, rec.id)) == rec


async def test_transition_of_unknown_task(store: TaskStore) -> None:
    with pytest.raises(NotFound):
        await transition(store, tenant_name(), new_task_id(), set_state(TaskState.RUNNING))


async def test_concurrent_transitions_apply_once_each(store: TaskStore) -> None:
    rec = make_record(tenant_name())
    await store.create(rec)
    await transition(store, rec.tenant, rec.id, set_state(TaskState.RUNNING))

    def bump(r: TaskRecord) -> TaskRecord:
        r.attempts += 1
        return r

    results = await asyncio.gather(*(transition(store, rec.tenant, rec.id, bump) for _ in range(10)))
    assert sorted(r.version for r in results) == list(range(2, 12))
    final = await store.get(rec.tenant, rec.id)
    assert final is not None
    assert (final.attempts, final.version) == (10, 11)


async def test_compare_and_set_stale_version(store: TaskStore) -> None:
    rec = make_record(tenant_name())
    await store.create(rec)
    first = rec.model_copy(update={"state": TaskState.RUNNING, "version": 1, "worker": "a"})
    assert await store.compare_and_set(first, 0)
    stale = rec.model_copy(update={"state": TaskState.CANCELLED, "version": 1, "worker": "b"})
    assert not await store.compare_and_set(stale, 0)
    got = await store.get(rec.tenant, rec.id)
    assert got is not None and (got.state, got.version, got.worker) == (TaskState.RUNNING, 1, "a")
    missing = make_record(rec.tenant).model_copy(update={"version": 1})
    assert not await store.compare_and_set(missing, 0)
    assert await store.get(missing.tenant, missing.id) is None


async def _seed(store: TaskStore, tenant: str, n: int) -> list[TaskRecord]:
    """``n`` records, some sharing a created_at so the id must break ties; newest first."""
    records = [make_record(tenant, created_at=1_700_000_000.0 + i // 3) for i in range(n)]
    for r in records:
        await store.create(r)
    return sorted(records, key=lambda r: (r.task.created_at, r.id), reverse=True)


async def _all_pages(
    store: TaskStore,
    tenant: str,
    state: TaskState | None = None,
    limit: int = 3,
) -> list[list[TaskRecord]]:
    pages: list[list[TaskRecord]] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.list(tenant, state=state, cursor=cursor, limit=limit)
        pages.append(page)
        if cursor is None:
            return pages
        assert len(pages) < 50, "cursor never ends"


async def test_list_newest_first(store: TaskStore) -> None:
    tenant = tenant_name()
    expected = await _seed(store, tenant, 7)
    page, cursor = await store.list(tenant)
    assert [r.id for r in page] == [r.id for r in expected]
    assert cursor is None
    assert await store.list(tenant_name()) == ([], None)


async def test_list_pagination_covers_all_once(store: TaskStore) -> None:
    tenant = tenant_name()
    expected = await _seed(store, tenant, 10)
    pages = await _all_pages(store, tenant, limit=3)
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    assert [r.id for p in pages for r in p] == [r.id for r in expected]
    exact = await _all_pages(store, tenant, limit=5)
    assert [r.id for p in exact for r in p] == [r.id for r in expected]
    assert all(len(p) == 5 for p in exact[:2])


async def test_list_tenant_isolation(store: TaskStore) -> None:
    a, b = tenant_name(), tenant_name()
    mine = await _seed(store, a, 4)
    theirs = await _seed(store, b, 3)
    page_a, _ = await store.list(a)
    page_b, _ = await store.list(b)
    assert [r.id for r in page_a] == [r.id for r in mine]
    assert [r.id for r in page_b] == [r.id for r in theirs]


async def test_list_state_filter(store: TaskStore) -> None:
    tenant = tenant_name()
    expected = await _seed(store, tenant, 9)
    running = expected[::2]
    for r in running:
        await transition(store, r.tenant, r.id, set_state(TaskState.RUNNING))
    pages = await _all_pages(store, tenant, state=TaskState.RUNNING, limit=2)
    got = [r for p in pages for r in p]
    assert [r.id for r in got] == [r.id for r in running]
    assert all(r.state is TaskState.RUNNING for r in got)
    queued, _ = await store.list(tenant, state=TaskState.QUEUED)
    assert [r.id for r in queued] == [r.id for r in expected[1::2]]
    assert await store.list(tenant, state=TaskState.FAILED) == ([], None)


async def test_ids_are_per_tenant(store: TaskStore) -> None:
    """Another tenant's id is simply another task: created, read and changed on its own."""
    a, b = tenant_name(), tenant_name()
    mine = TaskRecord(task=Task(tenant=a, id="shared-id"))
    theirs = TaskRecord(task=Task(tenant=b, id="shared-id"))
    theirs.task.params.prompt = "b's own"
    assert (await store.create(mine))[1]
    stored, created = await store.create(theirs)
    assert created and stored == theirs
    assert await store.get(a, "shared-id") == mine
    assert await store.get(b, "shared-id") == theirs
    assert await store.get(tenant_name(), "shared-id") is None
    running = await transition(store, b, "shared-id", set_state(TaskState.RUNNING))
    assert running.tenant == b and running.version == 1
    assert await store.get(a, "shared-id") == mine, "a's record is untouched"
    # compare-and-set addresses (tenant, id): a's version 0 is not b's
    stale = mine.model_copy(update={"state": TaskState.CANCELLED, "version": 1})
    assert await store.compare_and_set(stale, 0)
    got_b = await store.get(b, "shared-id")
    assert got_b is not None and got_b.state is TaskState.RUNNING
    assert [r.id for r in (await store.list(a))[0]] == ["shared-id"]
    assert [r.tenant for r in (await store.list(b))[0]] == [b]


async def test_a_finished_task_reopens_for_its_next_run_only(store: TaskStore) -> None:
    """A seed id sent again runs again (``reopened``): the record is queued as run 2, found under
    its new state and in its old place in the list, and only a later run reopens it."""
    tenant = tenant_name()
    records = await _seed(store, tenant, 3)
    middle = records[1]
    await transition(store, tenant, middle.id, set_state(TaskState.RUNNING))
    done = await transition(
        store, tenant, middle.id, set_state(TaskState.SUCCEEDED, result=TaskResult(images=["k.png"]))
    )
    with pytest.raises(TransitionConflict, match="not after run 1"):
        reopened(done, done.task)
    nxt = done.task.model_copy(update={"run": 2, "created_at": done.task.created_at + 99})
    again = reopened(done, nxt)
    assert await store.compare_and_set(again, done.version)
    assert not await store.compare_and_set(reopened(done, nxt), done.version), "one reopen per version"
    got = await store.get(tenant, middle.id)
    assert got == again and got.state is TaskState.QUEUED and got.task.run == 2
    assert got.result is None and got.attempts == 0 and got.task.created_at == done.task.created_at
    page, _ = await store.list(tenant)
    assert [r.id for r in page] == [r.id for r in records], "its place in the list is kept"
    assert middle.id not in {r.id for r in (await store.list(tenant, state=TaskState.SUCCEEDED))[0]}
    assert middle.id in {r.id for r in (await store.list(tenant, state=TaskState.QUEUED))[0]}
    with pytest.raises(TransitionConflict, match="only a finished task"):
        reopened(got, nxt.model_copy(update={"run": 3}))
    running = await transition(store, tenant, middle.id, set_state(TaskState.RUNNING))
    assert running.task.run == 2, "the run's own transitions follow as any task's"


async def test_delete_removes_the_record_only_at_its_version(store: TaskStore) -> None:
    """``DELETE /v1/tasks/{id}``: the record goes, from every listing, iff nobody wrote it
    meanwhile (a seed id sent again reopens it: that run must not be deleted)."""
    tenant = tenant_name()
    keep, gone = await _seed(store, tenant, 2)
    await transition(store, tenant, gone.id, set_state(TaskState.RUNNING))
    done = await transition(store, tenant, gone.id, set_state(TaskState.SUCCEEDED))
    assert not await store.delete(tenant, gone.id, done.version - 1), "an older version: kept"
    assert not await store.delete(_other_tenant(tenant), gone.id, done.version), "ids are per tenant"
    assert await store.get(tenant, gone.id) == done
    assert await store.delete(tenant, gone.id, done.version)
    assert not await store.delete(tenant, gone.id, done.version), "once"
    assert await store.get(tenant, gone.id) is None
    assert [r.id for r in (await store.list(tenant))[0]] == [keep.id]
    assert (await store.list(tenant, state=TaskState.SUCCEEDED))[0] == []
    again, created = await store.create(make_record(tenant).model_copy(update={"task": gone.task}))
    assert created and again.state is TaskState.QUEUED, "the id is free again"
    assert {r.id for r in (await store.list(tenant, state=TaskState.QUEUED))[0]} == {keep.id, gone.id}


def _other_tenant(tenant: str) -> str:
    return tenant + "-b"
