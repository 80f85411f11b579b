"""``sdfleet api`` with several worker processes on one port (api.workers): every worker serves the
links any worker made, the ops port adds all workers' ``/metrics`` up and serves the queue depths,
and SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fleet_tools import agent_process, write_fleet_file

from conftest import Engine, free_port, subprocess_env

pytestmark = [pytest.mark.timeout(240), pytest.mark.parametrize("engine", ["sqlite"], indirect=True)]

PARAMS = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64}
TASKS = 12


def _ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"sdfleet api exited with {proc.returncode}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout_s} s")


def _wait_all(url: str, ids: list[str], timeout_s: float = 120) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout_s
    while True:
        views = [httpx.get(f"{url}/v1/tasks/{i}", timeout=10).json() for i in ids]
        if all(v["state"] in ("succeeded", "failed") for v in views):
            return views
        assert time.monotonic() < deadline, [v["state"] for v in views]
        time.sleep(0.3)


def test_two_workers_share_links_metrics_and_stop(engine: Engine, tmp_path: Path) -> None:
    config = write_fleet_file(
        tmp_path / "sdfleet.yaml",
        {"queues": [{"name": "q", "runtime": "synthetic"}], "runtimes": {"synthetic": {"latency_s": 0.01}}},
    )
    port, metrics_port = free_port(), free_port()
    env = {**subprocess_env(engine, config), "SDFLEET_API__WORKERS": "2", "SDFLEET_LOG_JSON": "false"}
    env["SDFLEET_API__OPS_PORT"] = str(metrics_port)
    env.pop("SDFLEET_API__SIGNING_KEY", None)  # the supervisor makes one for both workers
    api = subprocess.Popen(
        [sys.executable, "-m", "sdfleet", "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _ready(url, api)
        ids = [
            httpx.post(f"{url}/v1/tasks", json={"params": PARAMS}, timeout=30).json()["id"]
            for _ in range(TASKS)
        ]
        # KEDA's metrics-api trigger reads the depth on the ops port: it was Prometheus text there
        ops = f"http://127.0.0.1:{metrics_port}"
        depth = httpx.get(f"{ops}/queues/q/depth", timeout=10)
        assert depth.status_code == 200 and depth.json()["depth"] == TASKS, depth.text
        assert httpx.get(f"{ops}/queues/nope/depth", timeout=10).status_code == 404
        with agent_process(engine, config, "q"):
            views = _wait_all(url, ids)
        assert httpx.get(f"{ops}/queues/q/depth", timeout=10).json()["depth"] == 0
        assert all(v["state"] == "succeeded" for v in views)
        # fresh connections land on either worker: every link works on every one of them
        links = [img["url"] for v in views for img in v["images"]]  # type: ignore[attr-defined]
        for link in links * 2:
            assert httpx.get(link, timeout=10).status_code == 200, link
        # every worker's counters, added up by the supervisor on the ops port; none on the public one
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert f'sdfleet_submitted_total{{origin="v1",queue="q"}} {TASKS}.0' in text
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 404
    finally:
        api.send_signal(signal.SIGTERM)
        try:
            code = api.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(api.pid, signal.SIGKILL)
            api.wait()
            raise
        finally:
            if api.stderr is not None:
                api.stderr.close()
    assert code == 0
