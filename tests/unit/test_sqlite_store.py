"""SqliteTaskStore specifics: several processes on one file, URLs, cursors, error mapping."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from sdfleet.errors import ConfigError, StoreUnavailable, ValidationFailed
from sdfleet.store import open_store
from sdfleet.store.backends.sqlite import SqliteTaskStore, decode_cursor, encode_cursor, sqlite_path
from sdfleet.store.base import transition
from sdfleet.tasks import Task, TaskRecord, TaskState

SPAWN = multiprocessing.get_context("spawn")


def _race_cas(url: str, task_id: str, worker: str, barrier: Barrier) -> None:
    """Child process: wait for the other, then try to take version 0 → 1."""

    async def main() -> bool:
        async with SqliteTaskStore.from_url(url) as store:
            current = await store.get("mp", task_id)
            assert current is not None
            new = current.model_copy(update={"state": TaskState.RUNNING, "version": 1, "worker": worker})
            barrier.wait(timeout=30)
            return await store.compare_and_set(new, 0)

    raise SystemExit(0 if asyncio.run(main()) else 3)


def _bump_many(url: str, task_id: str, n: int, barrier: Barrier) -> None:
    """Child process: ``n`` transitions that each add one attempt."""

    def bump(r: TaskRecord) -> TaskRecord:
        r.attempts += 1
        return r

    async def main() -> None:
        async with SqliteTaskStore.from_url(url) as store:
            barrier.wait(timeout=30)
            for _ in range(n):
                await transition(store, "mp", task_id, bump, tries=1000)

    asyncio.run(main())


def _run_children(target: Callable[..., None], args_of: list[tuple[object, ...]]) -> list[int | None]:
    procs = [SPAWN.Process(target=target, args=args) for args in args_of]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    return [p.exitcode for p in procs]


async def _new_task(url: str, state: TaskState = TaskState.QUEUED) -> TaskRecord:
    async with SqliteTaskStore.from_url(url) as store:
        rec, _ = await store.create(TaskRecord(task=Task(tenant="mp"), state=state))
    return rec


async def test_two_processes_race_compare_and_set(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    for _ in range(3):
        rec = await _new_task(url)
        barrier = SPAWN.Barrier(2)
        codes = await asyncio.to_thread(
            _run_children, _race_cas, [(url, rec.id, w, barrier) for w in ("a", "b")]
        )
        assert sorted(c for c in codes if c is not None) == [0, 3], codes
        winner = "ab"[codes.index(0)]
        async with SqliteTaskStore.from_url(url) as store:
            final = await store.get(rec.tenant, rec.id)
        assert final is not None
        assert (final.version, final.state, final.worker) == (1, TaskState.RUNNING, winner)


async def test_processes_share_transitions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    rec = await _new_task(url, TaskState.RUNNING)
    barrier = SPAWN.Barrier(3)
    codes = await asyncio.to_thread(_run_children, _bump_many, [(url, rec.id, 15, barrier)] * 3)
    assert codes == [0, 0, 0]
    async with SqliteTaskStore.from_url(url) as store:
        final = await store.get(rec.tenant, rec.id)
    assert final is not None and (final.attempts, final.version) == (45, 45)


async def test_shares_a_file_with_other_tables(tmp_path: Path) -> None:
    db = tmp_path / "sdfleet.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body BLOB)")
        conn.execute("INSERT INTO messages (body) VALUES (x'00')")
    conn.close()
    store = open_store(f"sqlite:///{db}")
    assert isinstance(store, SqliteTaskStore)
    rec, created = await store.create(TaskRecord(task=Task()))
    assert created and await store.get(rec.tenant, rec.id) == rec
    await store.aclose()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (1,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


def test_sqlite_urls(tmp_path: Path) -> None:
    assert sqlite_path("sqlite:////abs/dir/sdfleet.db") == "/abs/dir/sdfleet.db"
    assert sqlite_path("sqlite:///rel/sdfleet.db") == "rel/sdfleet.db"
    assert sqlite_path("sqlite:////abs/my%20dir/x.db") == "/abs/my dir/x.db"
    for bad in ("sqlite://", "sqlite:///", "sqlite://host/x.db", "redis://x/0"):
        with pytest.raises(ConfigError):
            sqlite_path(bad)
    store = SqliteTaskStore.from_url(f"sqlite:///{tmp_path}/nested/dir/x.db")
    assert store.path == tmp_path / "nested/dir/x.db"


def test_cursor_round_trip_and_garbage() -> None:
    assert decode_cursor(encode_cursor(1700000000.123456, "01hx:a.b")) == (1700000000.123456, "01hx:a.b")
    for bad in ("!!!", "e30", encode_cursor(1.0, "x")[:-3], "WzEsMl0"):  # {} / [1,2]
        with pytest.raises(ValidationFailed):
            decode_cursor(bad)


async def test_list_rejects_bad_arguments(tmp_path: Path) -> None:
    async with SqliteTaskStore(tmp_path / "x.db") as store:
        with pytest.raises(ValidationFailed):
            await store.list("t", cursor="not-a-cursor")
        for limit in (0, -1, 10_001):
            with pytest.raises(ValidationFailed):
                await store.list("t", limit=limit)


async def test_unusable_file_is_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "adir.db").mkdir()
    store = SqliteTaskStore(tmp_path / "adir.db")
    with pytest.raises(StoreUnavailable) as info:
        await store.get("t", "x")
    assert isinstance(info.value.__cause__, sqlite3.Error)
    await store.aclose()


async def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    store = SqliteTaskStore(tmp_path / "x.db")
    pending = asyncio.gather(*(store.get("t", f"id{i}") for i in range(5)), return_exceptions=True)
    await asyncio.sleep(0)
    await store.aclose()
    await store.aclose()
    assert all(r is None or isinstance(r, StoreUnavailable) for r in await pending)
    with pytest.raises(StoreUnavailable):
        await store.create(TaskRecord(task=Task()))


async def test_a_file_of_global_ids_is_migrated_to_ids_per_tenant(tmp_path: Path) -> None:
    """A database written when ids were global (key ``id``) keeps its records and takes ids per tenant."""
    db = tmp_path / "old.db"
    old = TaskRecord(task=Task(tenant="alice", id="shared"))
    with sqlite3.connect(db) as conn:
        conn.executescript(
            "CREATE TABLE task_records (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, state TEXT NOT NULL,"
            " created_at REAL NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL);"
            "CREATE INDEX task_records_by_tenant ON task_records (tenant, created_at DESC, id DESC);"
        )
        conn.execute(
            "INSERT INTO task_records VALUES (?, ?, ?, ?, ?, ?)",
            (old.id, old.tenant, old.state.value, old.task.created_at, old.version, old.model_dump_json()),
        )
    conn.close()
    async with SqliteTaskStore(db) as store:
        assert await store.get("alice", "shared") == old
        bobs = TaskRecord(task=Task(tenant="bob", id="shared"))
        assert (await store.create(bobs))[1]
        assert [r.id for r in (await store.list("alice"))[0]] == ["shared"]
    async with SqliteTaskStore(db) as again:  # a second open finds the new key and changes nothing
        assert await again.get("bob", "shared") == bobs
    with sqlite3.connect(db) as conn:
        key = [r[1] for r in conn.execute("PRAGMA table_info(task_records)") if r[5]]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert key == ["tenant", "id"] and "task_records_v0" not in tables
