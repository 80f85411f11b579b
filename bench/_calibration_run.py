"""The real half of the calibration: redis-server, ``sdfleet api`` and ``sdfleet agent`` processes
scaled by the simulator's own KEDA/HPA rule, on a scripted trace; everything on 127.0.0.1.

Only public interfaces are used (the CLI, the HTTP API, ``Bus.stats``, task records), so the
harness keeps working while the agent changes inside. Every process started here is stopped here,
by PID. ``dump``/``load`` keep a run to study the simulation offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fleet import Engine, free_port, open_engine, stop_process, wait_port
from sdfleet.bus import open_bus
from sdfleet.settings import FleetConfig, QueueConfig, ScalingConfig
from sdfleet.simulate.keda import Autoscaler
from sdfleet.simulate.params import KedaParams
from sdfleet.simulate.trace import Arrivals, Generator
from sdfleet.store import open_store
from sdfleet.tasks import TaskRecord

QUEUE = "calib"


@dataclass
class Scenario:
    workload: Generator
    latency_s: float = 0.25
    min_replicas: int = 0
    max_replicas: int = 4
    target_backlog: int = 5
    agent_env: dict[str, str] = field(default_factory=dict)
    """Extra ``SDFLEET_*`` environment of the real agents (e.g. a staged agent's settings)."""
    agent: dict[str, Any] = field(default_factory=dict)
    """The simulated agent's shape (``prefetch``, ``receive_max``, ``finish_concurrency``,
    ``max_batch`` ...), the same as ``agent_env`` gives the real ones."""
    keda: KedaParams = field(
        default_factory=lambda: KedaParams.model_validate(
            {
                "polling_s": 1,
                "hpa_sync_s": 1,
                "cooldown_s": 10,
                "scale_up": {"stabilization_s": 0, "policies": [{"type": "Pods", "value": 4, "period_s": 1}]},
                "scale_down": {
                    "stabilization_s": 5,
                    "policies": [{"type": "Pods", "value": 1, "period_s": 2}],
                },
            }
        )
    )
    timeout_s: float = 120.0

    def fleet(self) -> FleetConfig:
        scaling = ScalingConfig(
            min=self.min_replicas, max=self.max_replicas, target_backlog=self.target_backlog
        )
        return FleetConfig(
            queues=[QueueConfig(name=QUEUE, runtime="synthetic", scaling=scaling)],
            runtimes={"synthetic": {"latency_s": self.latency_s, "progress_steps": 1}},
            results_queue=None,
        )

    def arrivals(self) -> Arrivals:
        return self.workload.draw({}, 0.0)


@dataclass
class Real:
    records: list[TaskRecord]
    submitted: int
    start_s: list[float]
    """Each agent's spawn → ready file."""
    replicas: list[tuple[float, int]]
    wall_s: float
    events: list[tuple[float, str, int]] = field(default_factory=list)
    t0: float = 0.0
    """When the trace started, on the records' clock (time.time())."""
    accepted: dict[str, float] = field(default_factory=dict)
    """Task id → its ``202 Accepted`` (seconds from the trace's start): published by then."""


class Agents:
    """``sdfleet agent`` processes: spawned, ready when their ready file appears, SIGTERM newest first."""

    def __init__(self, env: dict[str, str], workdir: Path, t0: float) -> None:
        self.env, self.workdir, self.t0 = env, workdir, t0
        self.running: list[tuple[subprocess.Popen[bytes], float, Path]] = []
        self.stopping: list[subprocess.Popen[bytes]] = []
        self.start_s: list[float] = []
        self.events: list[tuple[float, str, int]] = []
        """(seconds since t0, spawn | ready | stop, agent number)."""

        self._pending: list[tuple[float, Path]] = []
        """(spawned, wall clock; its ready file)"""
        self._n = 0

    def scale_to(self, n: int) -> None:
        while len(self.running) < n:
            self._n += 1
            ready = self.workdir / f"agent-{self._n}"
            cmd = [sys.executable, "-m", "sdfleet", "agent", "-q", QUEUE, "--ready-dir", str(ready)]
            log = (self.workdir / f"agent-{self._n}.log").open("wb")
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            self.running.append((proc, time.monotonic(), ready))
            self._pending.append((time.time(), ready / f"{QUEUE}.ready"))
            self.events.append((time.monotonic() - self.t0, "spawn", self._n))

        while len(self.running) > n:
            proc, _, ready = self.running.pop()
            proc.send_signal(signal.SIGTERM)
            self.stopping.append(proc)
            self.events.append((time.monotonic() - self.t0, "stop", int(ready.name.split("-")[1])))

    def check_ready(self) -> None:
        still = []
        for spawned, path in self._pending:
            if path.exists():
                self.start_s.append(path.stat().st_mtime - spawned)
                since_t0 = path.stat().st_mtime - (time.time() - (time.monotonic() - self.t0))
                self.events.append((since_t0, "ready", int(path.parent.name.split("-")[1])))

            else:
                still.append((spawned, path))
        self._pending = still

    def close(self) -> None:
        for proc, _, _ in self.running:
            proc.send_signal(signal.SIGTERM)
        for proc in [p for p, _, _ in self.running] + self.stopping:
            stop_process(proc, timeout_s=10)
        self.running.clear()
        self.stopping.clear()


def _env(
    engine: Engine, workdir: Path, fleet_file: Path, api_port: int, extra: dict[str, str]
) -> dict[str, str]:
    return {
        **os.environ,
        **engine.env,
        "SDFLEET_BUS_URL": engine.bus_url,
        "SDFLEET_STORE_URL": engine.store_url,
        "SDFLEET_STORAGE_URL": engine.storage_url,
        "SDFLEET_CONFIG_FILE": str(fleet_file),
        "SDFLEET_DATA_DIR": str(workdir),
        "SDFLEET_API__PORT": str(api_port),
        "SDFLEET_AGENT__WAIT_S": "1",
        "SDFLEET_LOG_JSON": "false",
        "SDFLEET_LOG_LEVEL": "WARNING",
        **extra,
    }


async def _post_all(
    http: httpx.AsyncClient, arrivals: Arrivals, t0: float, ids: list[str], accepted: dict[str, float]
) -> None:
    async def post(i: int) -> None:
        params = {"prompt": f"calibration {i}", "steps": 1, "width": 64, "height": 64, "seed": i}
        r = await http.post("/v1/tasks", json={"params": params})
        r.raise_for_status()
        ids.append(r.json()["id"])
        accepted[ids[-1]] = time.monotonic() - t0

    posts = []
    for i, t in enumerate(arrivals.t.tolist()):
        await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))
        posts.append(asyncio.create_task(post(i)))
    await asyncio.gather(*posts)


async def _scale(
    scn: Scenario, agents: Agents, bus: Any, t0: float, done: asyncio.Event, log: list[tuple[float, int]]
) -> None:
    scaler = Autoscaler(
        scn.keda, min_replicas=scn.min_replicas, max_replicas=scn.max_replicas, target=scn.target_backlog
    )
    next_poll = next_sync = 0.0
    while not done.is_set():
        now = time.monotonic() - t0
        stats = await bus.stats(QUEUE)
        metric = stats.visible + (stats.in_flight if scn.keda.scale_on_in_flight else 0)
        if now >= next_poll:
            scaler.poll(now, metric)
            next_poll += scn.keda.polling_s
        if now >= next_sync:
            scaler.sync(now, metric)
            next_sync += scn.keda.hpa_sync_s
        agents.scale_to(scaler.replicas)
        agents.check_ready()
        log.append((now, scaler.replicas))
        await asyncio.sleep(max(0.0, min(next_poll, next_sync) - (time.monotonic() - t0)))


async def _wait_done(store: Any, ids: list[str], total: int, deadline: float) -> list[TaskRecord]:
    while time.monotonic() < deadline:
        if len(ids) == total:
            records = [await store.get("default", i) for i in ids]  # posted without a key
            if all(r is not None and r.state.terminal for r in records):
                return [r for r in records if r is not None]
        await asyncio.sleep(0.5)
    raise TimeoutError(f"tasks not finished in time ({len(ids)}/{total} submitted)")


async def run_real(scn: Scenario, workdir: Path) -> Real:
    """The scenario on real processes; every process started here is stopped here."""
    engine = open_engine("redis", workdir, {"bus": None, "store": None, "storage": None})
    fleet_file = workdir / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(scn.fleet().model_dump(mode="json")))
    port = free_port()
    env = _env(engine, workdir, fleet_file, port, scn.agent_env)
    api_log = (workdir / "api.log").open("wb")
    api = subprocess.Popen(
        [sys.executable, "-m", "sdfleet", "api"], env=env, stdout=api_log, stderr=subprocess.STDOUT
    )
    agents: Agents | None = None
    bus, store = open_bus(engine.bus_url), open_store(engine.store_url)
    try:
        wait_port(port, timeout_s=60)
        arrivals = scn.arrivals()
        ids: list[str] = []
        accepted: dict[str, float] = {}
        log: list[tuple[float, int]] = []

        began = time.monotonic()
        t0 = began + 1.0
        agents = Agents(env, workdir, t0)
        done = asyncio.Event()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            scaler = asyncio.create_task(_scale(scn, agents, bus, t0, done, log))
            await _post_all(http, arrivals, t0, ids, accepted)
            records = await _wait_done(store, ids, arrivals.total, time.monotonic() + scn.timeout_s)
            done.set()
            await scaler
        t0_wall = time.time() - (time.monotonic() - t0)
        real = Real(records, len(ids), agents.start_s, log, time.monotonic() - began, agents.events, t0_wall)
        real.accepted = accepted
        return real

    finally:
        if agents is not None:
            agents.close()
        stop_process(api)
        api_log.close()
        with contextlib.suppress(Exception):
            await bus.aclose()
            await store.aclose()
        engine.close()


def dump(real: Real, path: Path) -> None:
    """The real run's records and timeline, to study the simulation offline (``load``)."""
    data = {
        "records": [r.model_dump(mode="json") for r in real.records],
        "submitted": real.submitted,
        "start_s": real.start_s,
        "replicas": real.replicas,
        "wall_s": real.wall_s,
        "events": real.events,
        "t0": real.t0,
        "accepted": real.accepted,
    }

    path.write_text(json.dumps(data))


def load(path: Path) -> Real:
    data = json.loads(path.read_text())
    records = [TaskRecord.model_validate(r) for r in data["records"]]
    return Real(
        records,
        data["submitted"],
        data["start_s"],
        [(t, n) for t, n in data["replicas"]],
        data["wall_s"],
        [(t, k, n) for t, k, n in data["events"]],
        data["t0"],
        data.get("accepted", {}),
    )
