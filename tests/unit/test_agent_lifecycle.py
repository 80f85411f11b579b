"""Agent lifecycle pieces: ready/heartbeat files for the probes, and settle-once delivery handles."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdfleet.agent.handle import DeliveryHandle
from sdfleet.agent.loop import Agent
from sdfleet.build import Engines, agent_parts, make_runtime
from sdfleet.bus import QueueSpec, Subscription, Topology, open_bus
from sdfleet.errors import ConfigError
from sdfleet.settings import AgentSettings, FleetConfig, QueueConfig, Settings

LIVENESS = "import os, sys, time; sys.exit(time.time() - os.path.getmtime({path!r}) > {age})"


def _settings(tmp_path: Path) -> Settings:
    fleet = FleetConfig(queues=[QueueConfig(name="q", runtime="synthetic")])
    # The receive loop touches the heartbeat once per iteration, so at least every wait_s seconds.
    return Settings(data_dir=tmp_path, fleet=fleet, log_json=False, agent=AgentSettings(wait_s=0.5))


async def test_agent_writes_ready_and_heartbeat_files(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    engines = Engines(settings)
    await engines.ensure()
    parts = agent_parts(settings, engines, "q", make_runtime(settings, "q"))
    ready = tmp_path / "run" / "q.ready"
    agent = Agent(parts, ready_file=ready)
    running = asyncio.create_task(agent.run())
    try:
        alive = tmp_path / "run" / "q.alive"
        for _ in range(50):
            if ready.exists() and alive.exists():
                break
            await asyncio.sleep(0.1)
        assert ready.read_text() == "ready\n"
        first = alive.stat().st_mtime
        await asyncio.sleep(2.2)
        assert alive.stat().st_mtime > first, "the heartbeat file must keep being touched"
        fresh = subprocess.run([sys.executable, "-c", LIVENESS.format(path=str(alive), age=60)])
        assert fresh.returncode == 0
        os.utime(alive, (time.time() - 120, time.time() - 120))
        stale = subprocess.run([sys.executable, "-c", LIVENESS.format(path=str(alive), age=60)])
        assert stale.returncode == 1
    finally:
        agent.stop()
        await asyncio.wait_for(running, 20)
        await parts.fetcher.aclose()
        await engines.aclose()
    assert not ready.exists() and not (tmp_path / "run" / "q.alive").exists()


async def test_a_heartbeat_no_shorter_than_the_lease_is_a_config_error(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    settings.agent.heartbeat_s = settings.fleet.retry.lease_s
    engines = Engines(settings)
    parts = agent_parts(settings, engines, "q", make_runtime(settings, "q"))
    try:
        with pytest.raises(ConfigError, match=r"agent.heartbeat_s \(60\) must be shorter than the lease"):
            Agent(parts)
        settings.agent.heartbeat_s = None
        assert Agent(parts).period == settings.fleet.retry.lease_s / 3
    finally:
        await parts.fetcher.aclose()
        await engines.aclose()


async def test_handle_settles_once_and_extend_after_release_is_a_no_op(tmp_path: Path) -> None:
    bus = open_bus(f"sqlite:///{tmp_path}/bus.db")
    try:
        await bus.ensure(
            Topology(
                topics=["t"],
                queues=[QueueSpec(name="q", lease_s=30)],
                subscriptions=[Subscription(topic="t", queue="q")],
            )
        )
        await bus.publish("t", b"{}", {})
        (d,) = await bus.receive("q", max_messages=1, wait_s=1, lease_s=30)
        handle = DeliveryHandle(bus, d)
        await handle.release()
        await handle.extend(30)  # must not hide the released message again
        await handle.ack()  # nor delete it: it was already given back
        assert handle.settled
        again = await bus.receive("q", max_messages=1, wait_s=1)
        assert [x.message_id for x in again] == [d.message_id]
        assert again[0].receive_count == 2
    finally:
        await bus.aclose()
