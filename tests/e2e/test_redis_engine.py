"""The Redis engine under stress: a redis-server restart in the middle of a run, two agents on one
queue, a Redis that comes back empty, a Redis at its maxmemory. Each test runs its own redis-server
(appendonly) so stopping or filling it disturbs no other test."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from conftest import SD15, Engine, RunningFleet, StartFleet
from sdfleet.agent.loop import Agent
from sdfleet.bus import open_bus
from sdfleet.routing import fleet_topology
from sdfleet.runtimes.base import Job, ProgressFn, RuntimeResult
from sdfleet.settings import QueueConfig
from sdfleet.store import open_store
from sdfleet.tasks import TaskState

pytestmark = pytest.mark.timeout(120)

QUEUE = [QueueConfig(name="q", runtime="synthetic")]
PARAMS = {"prompt": "x", "steps": 2, "width": 64, "height": 64}


@pytest.fixture
def redis_args() -> tuple[str, ...]:
    """More ``redis-server`` arguments for ``private_redis``; a test parametrizes it to set some."""
    return ()


@pytest.fixture
def private_redis(redis_server: Any, tmp_path: Path, redis_args: tuple[str, ...]) -> Iterator[Any]:
    """A redis-server of our own (same class as the session one), appendonly on, free to stop."""
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = type(redis_server)(workdir, appendonly=True, args=redis_args)
    yield server
    server.stop()


@pytest.fixture
def engine(private_redis: Any, tmp_path: Path) -> Engine:
    """Overrides the e2e ``engine``: these tests are about the Redis engine only."""
    url = f"{private_redis.url}?prefix=e{time.monotonic_ns() % 10**8}"
    return Engine("redis", url, url, f"file://{tmp_path}/files")


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """No model files: the synthetic runtime accepts any model name."""
    path = tmp_path / "models"
    path.mkdir()
    return path


@dataclass
class Run:
    agent: int
    task_id: str
    start: float
    end: float = 0.0


@dataclass
class Recorder:
    """Wraps each agent's runtime to log every execution (agent, task, start, end)."""

    runs: list[Run] = field(default_factory=list)

    def attach(self, agents: list[Agent]) -> None:
        for n, agent in enumerate(agents):
            runtime = agent.parts.runtime
            inner = runtime.run

            async def run(job: Job, progress: ProgressFn, n: int = n, inner: Any = inner) -> RuntimeResult:
                entry = Run(n, job.task_id, time.monotonic())
                self.runs.append(entry)
                try:
                    result: RuntimeResult = await inner(job, progress)
                    return result
                finally:
                    entry.end = time.monotonic()

            runtime.run = run  # type: ignore[method-assign]

    def executions(self) -> Counter[str]:
        return Counter(r.task_id for r in self.runs)


def _body(n: int) -> dict[str, Any]:
    return {
        "model": SD15,
        "params": {"prompt": f"task {n}", "steps": 1, "width": 16, "height": 16, "seed": n},
    }


async def _submit(http: httpx.AsyncClient, n: int, unavailable: list[int]) -> str:
    """POST one task, retrying 503s like a client would (a new task id per try: ids are the server's)."""
    while True:
        r = await http.post("/v1/tasks", json=_body(n))
        if r.status_code == 503:
            unavailable.append(n)
            await asyncio.sleep(0.1)
            continue
        assert r.status_code == 202, r.text
        task_id: str = r.json()["id"]
        return task_id


async def _submit_all(
    http: httpx.AsyncClient, count: int, ids: list[str], unavailable: list[int], down: asyncio.Event
) -> None:
    """Submit ``count`` tasks; after the first third, go on only once Redis is down, so that some
    submissions meet the outage however fast this host submits (all had passed before it once)."""
    for n in range(count):
        if n == count // 3:
            await down.wait()
        ids.append(await _submit(http, n, unavailable))


async def _wait_succeeded(engine: Engine, ids: list[str], timeout_s: float) -> dict[str, Any]:
    store = open_store(engine.store_url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            records = {i: await store.get("default", i) for i in ids}
            pending = {i: r.state.value if r else None for i, r in records.items()}
            pending = {i: s for i, s in pending.items() if s != TaskState.SUCCEEDED.value}
            if not pending:
                return records
            assert time.monotonic() < deadline, f"{len(pending)} not succeeded: {list(pending.items())[:5]}"
            await asyncio.sleep(0.2)
    finally:
        await store.aclose()


async def _results(engine: Engine) -> list[dict[str, Any]]:
    """Every notification on the results queue (drained until a receive comes back empty)."""
    bus = open_bus(engine.bus_url)
    out: list[dict[str, Any]] = []
    try:
        while deliveries := await bus.receive("results", max_messages=10, wait_s=0.5):
            for d in deliveries:
                out.append(json.loads(d.body))
                await bus.ack(d)
    finally:
        await bus.aclose()
    return out


def _agent_jobs() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("agent-")}


async def _outage(server: Any, seconds: float, down: asyncio.Event) -> None:
    await asyncio.to_thread(server.stop)  # SIGTERM: redis fsyncs the AOF and exits
    down.set()
    await asyncio.sleep(seconds)
    await asyncio.to_thread(server.start)


async def test_redis_restart_mid_run(
    start_fleet: StartFleet,
    engine: Engine,
    private_redis: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    count, outage_s = 240, 1.5
    fleet: RunningFleet = await start_fleet(
        QUEUE,
        agents=["q", "q"],
        runtimes={"synthetic": {"latency_s": 0.02, "progress_steps": 1}},
        lease_s=4,
    )
    agents, jobs = list(fleet.fleet.agents), _agent_jobs()
    assert len(agents) == 2 and len(jobs) == 2
    recorder = Recorder()
    recorder.attach(agents)

    ids: list[str] = []
    unavailable: list[int] = []
    down = asyncio.Event()
    submitter = asyncio.create_task(_submit_all(fleet.http, count, ids, unavailable, down))
    while len(ids) < count // 3:
        await asyncio.sleep(0.01)
    done_before = len(recorder.runs)
    await _outage(private_redis, outage_s, down)
    done_at_restart = [a.processed for a in agents]
    await submitter
    records = await _wait_succeeded(engine, ids, timeout_s=45)

    # The outage hit the run: the API said 503 and retried submissions went through; work was in flight.
    assert unavailable, "no submission met the outage"
    assert 0 < done_before < count
    assert any(r.name.startswith("sdfleet.agent") and "unavailable" in r.message for r in caplog.records)
    # Every task succeeded with one result record and one image set; notifications once per task.
    assert len(set(ids)) == count
    for record in records.values():
        assert record is not None and record.result is not None
        keys, out_key = record.result.images, record.result.output
        assert len(keys) == 1 and keys[0].startswith(f"default/{record.id}/{record.id}-")
        # one run, one set of files: a second run would have left files under another tag
        assert sorted(p.name for p in (tmp_path / "files" / keys[0]).parent.iterdir()) == sorted(
            Path(k).name for k in [*keys, out_key]
        )
    # One notification per task; at-least-once allows a copy when the server stopped between applying
    # a publish and replying (the agent retries it): then the copy is the same notification.
    notes = await _results(engine)
    assert all(n["type"] == "succeeded" for n in notes), Counter(n["type"] for n in notes)
    copies: dict[str, list[str]] = defaultdict(list)
    for n in notes:
        copies[n["task_id"]].append(json.dumps(n, sort_keys=True))
    odd = {i: copies[i] for i in ids if len(set(copies[i])) != 1}
    assert not odd, f"tasks without exactly one distinct notification: {odd}"
    extra_notes = sum(len(copies[i]) - 1 for i in ids)
    assert extra_notes <= 2
    # Same agents, same asyncio tasks, still running, and both worked after the restart.
    assert fleet.fleet.agents == agents and _agent_jobs() == jobs
    assert not any(j.done() for j in jobs)
    assert all(a.processed > before for a, before in zip(agents, done_at_restart, strict=True))
    # A 503 can hide a task that was published after all (the server went away before it replied):
    # such a task runs though the client never learnt its id; a client that sets ``id`` avoids it.
    executions = recorder.executions()
    assert set(ids) <= set(executions) and len(set(executions) - set(ids)) <= len(unavailable)
    print(
        f"\n{count} tasks, outage {outage_s}s, {len(unavailable)} 503s, "
        f"{sum(executions[i] for i in ids) - count} duplicate executions, "
        f"{len(set(executions) - set(ids))} tasks run after a 503, "
        f"{extra_notes} duplicate notifications"
    )


async def test_two_agents_never_run_one_task_at_once(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(
        QUEUE,
        agents=["q", "q"],
        runtimes={"synthetic": {"latency_s": 2.0, "progress_steps": 4}},
        # Shorter than a run: only the heartbeat keeps the other agent off the task. A stall of the
        # test's one event loop (both agents and the API) past 0.9 s would let it take one over.
        lease_s=1.2,
        heartbeat_s=0.3,
    )
    # Different speeds, so one agent is free to receive while the other is mid-run.
    fleet.fleet.agents[1].parts.runtime.latency_s = 1.4  # type: ignore[attr-defined]
    recorder = Recorder()
    recorder.attach(list(fleet.fleet.agents))
    ids = [await _submit(fleet.http, n, []) for n in range(10)]
    for task_id in ids:
        view = await fleet.wait(task_id, timeout_s=30)
        assert view["state"] == "succeeded", view

    assert {r.agent for r in recorder.runs} == {0, 1}, "both agents should have worked"
    for task_id in ids:
        runs = sorted((r for r in recorder.runs if r.task_id == task_id), key=lambda r: r.start)
        assert runs, task_id
        for a, b in itertools.pairwise(runs):
            assert a.end <= b.start, f"task {task_id} ran twice at once: {runs}"


@pytest.mark.parametrize("may_ensure", [True, False], ids=["ensure_topology", "owned_elsewhere"])
async def test_a_redis_that_comes_back_empty_gets_its_topology_again(
    start_fleet: StartFleet,
    engine: Engine,
    private_redis: Any,
    caplog: pytest.LogCaptureFixture,
    may_ensure: bool,
) -> None:
    """A Redis restarted without persistence (here: FLUSHDB) loses the topics and queues. The
    agent used to exit (`queue 'q' does not exist`), taking `sdfleet up`'s API with it, and the
    API answered submits 404. Now both put the topology back, or, where the topology is not theirs
    to create, wait for `sdfleet ensure` like through an outage (503s meanwhile)."""
    fleet = await start_fleet(QUEUE, runtimes={"synthetic": {"latency_s": 0.02}})
    first = await fleet.http.post("/v1/tasks", json={"params": PARAMS})
    assert (await fleet.wait(first.json()["id"]))["state"] == "succeeded"
    assert fleet.fleet.server is not None
    keeper = fleet.fleet.server.config.app.state.ctx.keeper  # one per process: the API's and the agent's
    assert keeper is not None and all(a.parts.keeper is keeper for a in fleet.fleet.agents)
    keeper.allowed = may_ensure  # False: as `ensure_topology: false` builds it
    client = aioredis.from_url(private_redis.url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    await asyncio.sleep(1.5)  # the agent's receive finds its queue gone
    r = await fleet.http.post("/v1/tasks", json={"params": PARAMS})
    if not may_ensure:
        assert r.status_code == 503 and r.json()["error"]["code"] == "bus_unavailable", r.text
        said = [rec.name for rec in caplog.records if "run `sdfleet ensure`" in rec.getMessage()]
        assert {"sdfleet.agent.loop", "sdfleet.api.app"} <= set(said), said  # the operator is told
        bus = open_bus(engine.bus_url)
        try:
            await bus.ensure(fleet_topology(fleet.settings.fleet))  # what `sdfleet ensure` does
        finally:
            await bus.aclose()
        r = await fleet.http.post("/v1/tasks", json={"params": PARAMS})
    assert r.status_code == 202, r.text
    view = await fleet.wait(r.json()["id"], timeout_s=30)
    assert view["state"] == "succeeded", view
    assert not fleet.task.done(), "the fleet (API and agents) must still be running"
    assert (keeper.restored >= 1) == may_ensure


# A Redis at its maxmemory (``noeviction``, the policy a queue needs): a burst that fills it is
# refused with a 503 and its reason, never a 500; the agents drain what was taken, which frees
# room, and submits are taken again.
PROMPT = "a lighthouse at dusk, " * 2000  # 44 kB: about 90 kB of Redis a task (message and record)
FULL = ("--maxmemory", "6mb", "--maxmemory-policy", "noeviction")


async def _used_mb(server: Any) -> float:
    client = aioredis.Redis(port=server.port)
    try:
        return float((await client.info("memory"))["used_memory"]) / 2**20
    finally:
        await client.aclose()


@pytest.mark.parametrize("redis_args", [FULL], ids=["6mb"])
async def test_a_full_redis_refuses_submits_with_503_and_drains(
    start_fleet: StartFleet, private_redis: Any
) -> None:
    api = await start_fleet(QUEUE, agents=[], runtimes={"synthetic": {"latency_s": 0.01}})
    taken: list[str] = []
    for _ in range(200):
        r = await api.http.post("/v1/tasks", json={"params": {"prompt": PROMPT, "width": 64, "height": 64}})
        if r.status_code != 202:
            break
        taken.append(r.json()["id"])
    assert r.status_code == 503, f"{r.status_code} after {len(taken)} tasks: {r.text}"
    assert r.json()["error"] in (
        {"code": "bus_full", "message": "the task bus is full; retry later"},
        {"code": "store_full", "message": "the task store is full; retry later"},
    ), r.text
    assert 20 <= len(taken) < 200, len(taken)
    assert await _used_mb(private_redis) < 6.5, "Redis went on past its maxmemory"
    # Reads still answer while it is full.
    assert (await api.http.get(f"/v1/tasks/{taken[0]}")).json()["state"] == "queued"
    assert (await api.http.get("/v1/queues")).status_code == 200

    # An agent comes: every task taken runs and is recorded, though Redis is full when it starts.
    await start_fleet(QUEUE, with_api=False, runtimes={"synthetic": {"latency_s": 0.01}})
    for task_id in taken:
        assert (await api.wait(task_id, timeout_s=60))["state"] == "succeeded", task_id

    # Their messages are gone, their records stay: room again.
    deadline = time.monotonic() + 10
    while (r := await api.http.post("/v1/tasks", json={"params": {"prompt": "after"}})).status_code != 202:
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
    assert (await api.wait(r.json()["id"]))["state"] == "succeeded"
