"""SqliteBus specifics the contract suite does not cover: URLs, several processes, error mapping."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdfleet.bus import QueueSpec, Subscription, Topology, open_bus
from sdfleet.bus.backends.sqlite import SqliteBus, path_from_url
from sdfleet.errors import BusUnavailable, ConfigError, NotFound

TOPO = Topology(
    topics=["tasks"],
    queues=[QueueSpec(name="q", lease_s=30)],
    subscriptions=[Subscription(topic="tasks", queue="q")],
)

# A receiver process: signals it is ready, waits until the other one is too, then leases one message
# at a time until the queue stays empty, acking each after a little work, and prints what it got.
RECEIVER = """
import asyncio, json, os, sys, time
from pathlib import Path
from sdfleet.bus.backends.sqlite import SqliteBus

async def main(url, ready_dir):
    bus = SqliteBus.from_url(url)
    await bus.stats("q")
    (Path(ready_dir) / str(os.getpid())).touch()
    deadline = time.monotonic() + 30
    while len(list(Path(ready_dir).iterdir())) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    got, empty = [], 0
    while empty < 3:
        batch = await bus.receive("q", max_messages=1, lease_s=30)
        empty = 0 if batch else empty + 1
        for d in batch:
            got.append(d.body.decode())
            await asyncio.sleep(0.005)  # "work", so neither process can drain the queue alone
            await bus.ack(d)
    await bus.aclose()
    print(json.dumps(got))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_path_from_url() -> None:
    assert path_from_url("sqlite:////abs/dir/bus.db") == "/abs/dir/bus.db"
    assert path_from_url("sqlite:///rel/bus.db") == "rel/bus.db"
    assert path_from_url("sqlite://") == ":memory:"
    with pytest.raises(ConfigError):
        path_from_url("sqlite://host/bus.db")


async def test_from_url_creates_parent_dirs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a' / 'b' / 'bus.db'}"
    assert url.startswith("sqlite:////")
    bus = open_bus(url)
    assert isinstance(bus, SqliteBus)
    await bus.ensure(TOPO)
    await bus.aclose()
    assert (tmp_path / "a" / "b" / "bus.db").is_file()


async def test_relative_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    async with SqliteBus.from_url("sqlite:///data/bus.db") as bus:
        await bus.ensure(TOPO)
    assert (tmp_path / "data" / "bus.db").is_file()


async def test_in_memory_bus_works() -> None:
    async with SqliteBus.from_url("sqlite://") as bus:
        await bus.ensure(TOPO)
        await bus.publish("tasks", b"m", {})
        assert [d.body for d in await bus.receive("q")] == [b"m"]


async def test_topology_is_shared_through_the_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bus.db'}"
    async with SqliteBus.from_url(url) as api, SqliteBus.from_url(url) as agent:
        await api.ensure(TOPO)
        await agent.publish("tasks", b"m", {"a": "1"})
        (d,) = await api.receive("q")
        assert (d.body, dict(d.attributes)) == (b"m", {"a": "1"})


async def test_unknown_queue_is_not_found(tmp_path: Path) -> None:
    async with SqliteBus.from_url(f"sqlite:///{tmp_path / 'bus.db'}") as bus:
        await bus.ensure(TOPO)
        with pytest.raises(NotFound):
            await bus.receive("nope")
        with pytest.raises(NotFound):
            await bus.stats("nope")


async def test_subscription_to_unknown_queue_is_a_config_error(tmp_path: Path) -> None:
    async with SqliteBus.from_url(f"sqlite:///{tmp_path / 'bus.db'}") as bus:
        with pytest.raises(ConfigError):
            await bus.ensure(Topology(topics=["t"], subscriptions=[Subscription(topic="t", queue="nope")]))


async def test_sqlite_errors_become_bus_unavailable(tmp_path: Path) -> None:
    (tmp_path / "bus.db").mkdir()
    bus = SqliteBus.from_url(f"sqlite:///{tmp_path / 'bus.db'}")
    with pytest.raises(BusUnavailable):
        await bus.ensure(TOPO)
    await bus.aclose()


async def test_closed_bus_is_unavailable(tmp_path: Path) -> None:
    bus = SqliteBus.from_url(f"sqlite:///{tmp_path / 'bus.db'}")
    await bus.ensure(TOPO)
    await bus.aclose()
    await bus.aclose()
    with pytest.raises(BusUnavailable):
        await bus.stats("q")


async def test_oldest_age_counts_from_publish(tmp_path: Path) -> None:
    async with SqliteBus.from_url(f"sqlite:///{tmp_path / 'bus.db'}") as bus:
        await bus.ensure(TOPO)
        assert (await bus.stats("q")).oldest_age_s is None
        await bus.publish("tasks", b"m", {})
        await asyncio.sleep(0.3)
        age = (await bus.stats("q")).oldest_age_s
        assert age is not None and 0.25 <= age < 5


async def test_long_poll_sees_a_publish_from_another_connection(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bus.db'}"
    async with SqliteBus.from_url(url) as receiver, SqliteBus.from_url(url) as publisher:
        await receiver.ensure(TOPO)

        async def publish_soon() -> None:
            await asyncio.sleep(0.2)
            await publisher.publish("tasks", b"m", {})

        start = time.monotonic()
        got, _ = await asyncio.gather(receiver.receive("q", wait_s=5), publish_soon())
        assert [d.body for d in got] == [b"m"]
        assert time.monotonic() - start < 1.5


async def test_two_processes_never_lease_the_same_message(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bus.db'}"
    sent = [f"m{i:03}" for i in range(150)]
    async with SqliteBus.from_url(url) as bus:
        await bus.ensure(TOPO)
        for body in sent:
            await bus.publish("tasks", body.encode(), {})
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", RECEIVER, url, str(ready)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    first, second = (set(o) for o in outs)
    assert not first & second
    assert sorted(first | second) == sent
    assert sum(len(o) for o in outs) == len(sent)
    assert first and second, "both processes should have received something"


async def test_cancelled_receive_gives_its_lease_back(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    async with SqliteBus.from_url(f"sqlite:///{path}") as bus:
        await bus.ensure(TOPO)
        await bus.publish("tasks", b"m", {})
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the receive's query now waits for the write lock
        receiving = asyncio.create_task(bus.receive("q", lease_s=30))
        await asyncio.sleep(0.2)
        receiving.cancel()
        blocker.rollback()
        blocker.close()
        with pytest.raises(asyncio.CancelledError):
            await receiving
        (d,) = await bus.receive("q", lease_s=30)
        assert (d.body, d.receive_count) == (b"m", 2)
