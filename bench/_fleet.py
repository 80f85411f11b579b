"""Engines and a fleet process for the fleet benchmarks: all on 127.0.0.1, every process stopped by PID.

``python bench/_fleet.py SETTINGS.json AGENTS`` serves one fleet (API + AGENTS agents on the queue
``bench``, one event loop, as ``sdfleet up`` does) until SIGTERM; ``FleetProcess`` starts it so the
benchmark's clients do not share the fleet's event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from sdfleet.settings import AgentSettings, ApiSettings, FleetConfig, ModelsConfig, QueueConfig, Settings
from sdfleet.urls import file_url, sqlite_url

QUEUE = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout_s} s")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Engine:
    """Where the fleet keeps its tasks; ``env`` goes to the fleet process; ``procs`` are ours to stop."""

    name: str
    bus_url: str
    store_url: str
    storage_url: str
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def close(self) -> None:
        for proc in self.procs:
            stop_process(proc)
        self.procs.clear()


def _start_redis(workdir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server), or give --bus-url")
    port = free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    proc = subprocess.Popen(
        [*args, "--save", "", "--appendonly", "no", "--protected-mode", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return f"redis://127.0.0.1:{port}/0", proc


def _start_moto() -> tuple[str, subprocess.Popen[bytes]]:
    exe = shutil.which(
        "moto_server", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if exe is None:
        raise RuntimeError("moto_server is not installed (pip install 'moto[server]'), or give --bus-url")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_port(port)
    return f"http://127.0.0.1:{port}", proc


def open_engine(kind: str, workdir: Path, urls: dict[str, str | None]) -> Engine:
    """The engine named ``kind`` (sqlite, redis, aws), with a fresh namespace; given URLs win."""
    ns = f"b{uuid.uuid4().hex[:8]}"
    files = file_url(workdir / "files")
    if kind == "sqlite":
        db = sqlite_url(workdir / "fleet.db")
        engine = Engine(kind, db, db, files)
    elif kind == "redis":
        engine = Engine(kind, "", "", files)
        if urls["bus"] is None:
            url, proc = _start_redis(workdir)
            engine.procs.append(proc)
            engine.bus_url = engine.store_url = f"{url}?prefix={ns}"
    elif kind == "aws":
        aws = f"aws://?prefix={ns}-&region=us-east-1"
        # On a given (maybe real) AWS bus, images stay local unless --storage-url says otherwise.
        s3 = f"s3://{ns}-out/results?create=true&region=us-east-1"
        engine = Engine(kind, aws, aws, files if urls["bus"] else s3)
        if urls["bus"] is None:
            endpoint, proc = _start_moto()
            engine.procs.append(proc)
            engine.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing"}
            engine.env |= {"AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    else:
        raise ValueError(f"unknown engine {kind!r}: sqlite, redis or aws")
    engine.bus_url = urls["bus"] or engine.bus_url
    engine.store_url = urls["store"] or urls["bus"] or engine.store_url
    engine.storage_url = urls["storage"] or engine.storage_url
    return engine


def bench_settings(engine: Engine, workdir: Path, latency_s: float, *, prefetch: int = 1) -> Settings:
    """One queue ``bench`` on the synthetic runtime, one progress write per task (a real runtime's last)."""
    fleet = FleetConfig(
        queues=[QueueConfig(name=QUEUE, runtime="synthetic")],
        runtimes={"synthetic": {"latency_s": latency_s, "progress_steps": 1}},
        models=ModelsConfig(dir=workdir / "models"),
    )
    return Settings(
        data_dir=workdir,
        bus_url=engine.bus_url,
        store_url=engine.store_url,
        storage_url=engine.storage_url,
        api=ApiSettings(port=free_port()),
        agent=AgentSettings(prefetch=prefetch, wait_s=1.0),  # a short long-poll: quick shutdown
        fleet=fleet,
        log_json=False,
        log_level="WARNING",
    )


@dataclass
class FleetProcess:
    """``python bench/_fleet.py``: API + agents in a child process, ready when ``/readyz`` answers."""

    settings: Settings
    agents: int
    engine: Engine
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.api.port}"

    async def start(self, timeout_s: float = 60.0) -> None:
        spec = self.log_path.with_suffix(".settings.json")
        spec.write_text(self.settings.model_dump_json())
        self._log = self.log_path.open("wb")
        env = {**os.environ, **self.engine.env}
        cmd = [sys.executable, str(Path(__file__).resolve()), str(spec), str(self.agents)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the fleet exited ({self.proc.returncode}); see {self.log_path}")
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"the fleet was not ready after {timeout_s} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout_s=30.0)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _serve(spec: Path, agents: int) -> None:
    from sdfleet.serve import Fleet
    from sdfleet.telemetry import setup_logging

    settings = Settings(**json.loads(spec.read_text()))
    setup_logging(settings.log_level, settings.log_json)

    async def run() -> None:
        fleet = Fleet(settings, [QUEUE] * agents)
        fleet.install_signal_handlers()
        await fleet.run()

    asyncio.run(run())


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), int(sys.argv[2]))
