"""Every query of the Grafana dashboard against a real Prometheus (Debian's ``prometheus``,
``make system-deps`` installs it) scraping a running ``sdfleet up``, and a DCGM exporter's
exposition as dcgm-exporter 4.5.3-4.8.2 writes it for a GPU allocated to the fleet's pod.

The fleet runs two queues; one gets tasks, the other stays idle. Checked: every expression
evaluates; the idle queue's agent shows 0, not "No data"; the "in range" stats count every task,
the first included; the GPU panels join DCGM's per-pod series to the agents.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="no prometheus binary (`make system-deps` installs Debian's: apt-get install prometheus)",
    ),
]

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sdfleet-dashboard.json"
BUSY, IDLE = "busy", "idle"
TASKS = 5
POD = {"namespace": "sd", "pod": "fleet-sdfleet-busy-7d9f8-x2x4q"}
"""What the PodMonitor adds to the agents' series, and DCGM's pod mapping to the GPU's."""
GPU_UTIL, FB_USED, FB_FREE = 37.0, 9000.0, 15000.0


def _dcgm_exposition() -> bytes:
    """``/metrics`` of dcgm-exporter (rendermetrics' GPU template): GPU 0 allocated to the fleet's
    pod, GPU 1 to nobody."""
    fields = [
        ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", GPU_UTIL, 0.0),
        ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", FB_FREE, 24000.0),
        ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", FB_USED, 0.0),
    ]
    lines = []
    for name, kind, help_, used, idle in fields:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for gpu, value in ((0, used), (1, idle)):
            labels = (
                f'gpu="{gpu}",UUID="GPU-3a5f2c1e-8d4b-4f6a-9c2e-0b1d2e3f4a5{gpu}",'
                f'pci_bus_id="00000000:00:1{gpu}.0",device="nvidia{gpu}",modelName="NVIDIA A10G",'
                'Hostname="ip-10-0-12-34.eu-west-1.compute.internal",DCGM_FI_DRIVER_VERSION="550.127.05"'
            )
            if gpu == 0:
                labels += f',container="agent",namespace="{POD["namespace"]}",pod="{POD["pod"]}"'
            lines.append(f"{name}{{{labels}}} {value:g}")
    return ("\n".join(lines) + "\n").encode()


class _Exporter(BaseHTTPRequestHandler):
    body = _dcgm_exposition()

    def do_GET(self) -> None:
        if self.path != "/metrics":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *_: Any) -> None:
        pass


def _wait(url: str, procs: list[subprocess.Popen[bytes]], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [(p.args, p.returncode) for p in procs]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout_s}s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(API URL, Prometheus URL): ``sdfleet up`` and a DCGM exposition, scraped every second."""
    tmp = tmp_path_factory.mktemp("prom")
    fleet = {
        "queues": [
            {"name": BUSY, "runtime": "synthetic", "filter": {"sd_model_checkpoint": ["m-busy"]}},
            {"name": IDLE, "runtime": "synthetic", "filter": {"sd_model_checkpoint": ["m-idle"]}},
        ],
        "runtimes": {"synthetic": {"latency_s": 0.05}},
        "models": {"dir": str(tmp / "models")},
    }
    (tmp / "sdfleet.yaml").write_text(yaml.safe_dump(fleet))
    api_port, prom_port = free_port(), free_port()
    exporter = ThreadingHTTPServer(("127.0.0.1", 0), _Exporter)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    scrape = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "sdfleet",
                "static_configs": [{"targets": [f"127.0.0.1:{api_port}"], "labels": POD}],
            },
            {
                "job_name": "dcgm-exporter",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{exporter.server_address[1]}"]}],
            },
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(scrape))
    env = {
        **os.environ,
        "SDFLEET_CONFIG_FILE": str(tmp / "sdfleet.yaml"),
        "SDFLEET_DATA_DIR": str(tmp / "data"),
        "SDFLEET_API__QUEUE_STATS_S": "1",
        "SDFLEET_AGENT__WAIT_S": "1",
    }
    cli = [sys.executable, "-c", "from sdfleet.cli import main; main()"]
    assert PROMETHEUS is not None
    procs = [
        subprocess.Popen([*cli, "up", "--port", str(api_port)], env=env, stderr=subprocess.DEVNULL),
        subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        api, prom = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prom_port}"
        _wait(f"{api}/healthz", procs)
        _wait(f"{prom}/-/ready", procs)
        yield api, prom
    finally:
        _stop(procs)
        exporter.shutdown()
        exporter.server_close()


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _until(prom: str, expr: str, done: Any, timeout_s: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = _query(prom, expr)
        if done(result):
            return result
        assert time.monotonic() < deadline, (expr, result)
        time.sleep(0.25)


def _panels() -> dict[str, list[str]]:
    dash = json.loads(DASHBOARD.read_text())
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in dash["panels"] if p.get("targets")}


def _as_grafana(expr: str, range_: str) -> str:
    """The query Grafana sends: the queue variable on "All" (``.*``), its intervals filled in."""
    return expr.replace("$queue", ".*").replace("$__rate_interval", "10s").replace("$__range", range_)


def _by_queue(result: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"].get("queue", ""): float(r["value"][1]) for r in result}


def test_every_panel_query_on_a_real_prometheus(stack: tuple[str, str]) -> None:
    api, prom = stack
    started = time.monotonic()
    # two scrapes (increase() needs two samples): both agents report before any task, at 0
    _until(prom, "count_over_time(sdfleet_agent_info[1m]) >= 2", lambda r: len(r) == 2)
    panels = _panels()
    idle_range = _as_grafana(panels["Succeeded in range"][0], "5m")
    assert _by_queue(_query(prom, idle_range)) == {"": 0.0}, "idle fleet: 0, not No data"
    agents = _by_queue(_query(prom, _as_grafana(panels["Agents reporting"][0], "5m")))
    assert agents == {BUSY: 1.0, IDLE: 1.0}
    with httpx.Client(base_url=api, timeout=10) as http:
        ids = [
            http.post("/v1/tasks", json={"model": "m-busy", "params": {"prompt": f"a kite {n}"}}).json()["id"]
            for n in range(TASKS)
        ]
        for task_id in ids:
            deadline = time.monotonic() + 60
            while http.get(f"/v1/tasks/{task_id}").json()["state"] != "succeeded":
                assert time.monotonic() < deadline, task_id
                time.sleep(0.1)
    total = f'sum(sdfleet_tasks_total{{state="succeeded"}}) == {TASKS}'
    _until(prom, total, lambda r: len(r) == 1)
    time.sleep(1.5)  # one more scrape of the gauges and the GPU counter
    range_ = f"{int(time.monotonic() - started) + 60}s"
    results = {}
    for title, exprs in panels.items():
        for expr in exprs:
            results[(title, expr)] = _query(prom, _as_grafana(expr, range_))  # evaluates, no error
    # increase() no longer undercounts (the series start at 0 before the first task); it may still
    # overshoot a little: Prometheus extrapolates the slope to the end of the range (never below 0
    # at its start), as its documentation says.
    for title in ("Succeeded in range", "Submitted in range"):
        value = _by_queue(results[(title, panels[title][0])])[""]
        assert TASKS <= round(value) <= TASKS * 1.5, (title, value)
    assert _by_queue(results[("Failed in range", panels["Failed in range"][0])]) == {"": 0.0}
    gpu_busy = panels["GPU busy vs agent busy"]
    dcgm = _by_queue(results[("GPU busy vs agent busy", next(e for e in gpu_busy if "DCGM" in e))])
    assert dcgm == {BUSY: GPU_UTIL / 100, IDLE: GPU_UTIL / 100}, "both agents run in the GPU's pod"
    memory = panels["GPU memory used"]
    used = _by_queue(results[("GPU memory used", memory[0])])
    assert used[BUSY] == FB_USED * 1048576
    assert _by_queue(results[("GPU memory used", memory[1])])[BUSY] == (FB_USED + FB_FREE) * 1048576
    gpu_s = _by_queue(results[("GPU-seconds in range", panels["GPU-seconds in range"][0])])
    assert gpu_s[BUSY] >= TASKS * 0.05 * 0.9 and gpu_s[IDLE] == 0.0
    held = _by_queue(results[("Tasks held ahead (limit)", panels["Tasks held ahead (limit)"][0])])
    assert set(held) == {BUSY, IDLE} and min(held.values()) >= 1, held
    p50 = panels["Stage duration p50"][0]
    stages = {r["metric"]["stage"] for r in _query(prom, _as_grafana(p50, range_).replace("10s", range_))}
    assert {"queue_wait", "runtime_run", "storage_put"} <= stages
    assert all(re.search(r"sdfleet_|DCGM_FI_", e) for es in panels.values() for e in es)
