"""Front-door throughput: accepted submits per second and their latency, on the embedded engine.

Per round: a fresh ``sdfleet api`` (or ``sdfleet up``) process on a temp dir (SQLite bus and
store, local files) with ``--workers`` API processes, then a load generator in a process of its
own (``bench/_load.py``): ``--clients`` keep-alive connections POST a text-to-image task to
``/v1/tasks`` as fast as answers come, ``--warmup`` requests first (not counted), then
``--tasks``. ``sdfleet up`` also runs an agent on the queue (synthetic runtime, ``--latency-s``),
which competes for the same CPUs, as it does on one machine.

Besides rate and latency it reports the server's CPU time per request (all its processes, from
``/proc``), which hardly moves when other jobs share the machine: on a quiet machine with C cores
the rate can reach about C / (server + load generator CPU per request).

``--src DIR`` runs the server from another checkout's ``src`` (the load is the same), and
``--rounds N`` alternates the two (this checkout first), so that before/after numbers come from
the same minutes of a noisy machine. The table shows each round; JSON goes to
``bench/results/submit_throughput-<mode>-<timestamp>.json``. Examples::

    sdfleet bench run submit_throughput                               # sdfleet api, 2 workers
    sdfleet bench run submit_throughput -- --mode up --tasks 2000
    sdfleet bench run submit_throughput -- --src /tmp/base/src --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from sdfleet.cli_common import print_table

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
RESULTS = HERE / "results"
BODY = {"params": {"prompt": "a lighthouse at dusk", "steps": 2, "width": 64, "height": 64}}


def pct(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max (nearest rank), in milliseconds."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000

    return {
        "n": len(ordered),
        "p50": rank(0.5),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": ordered[-1] * 1000,
    }


@dataclass
class Round:
    label: str
    accepted: int
    requests: int
    wall_s: float
    status: dict[str, int]
    latency_ms: dict[str, float]
    cpu_ms_per_request: float
    """CPU time (user + system) of the server's processes per measured request: unlike the rate,
    it hardly moves when other jobs share the machine."""

    @property
    def accepted_per_s(self) -> float:
        return self.accepted / self.wall_s if self.wall_s else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants so far (Linux ``/proc``)."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        todo += [int(c) for c in children]
    return total


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fleet_file(folder: Path, latency_s: float) -> Path:
    path = folder / "sdfleet.yaml"
    path.write_text(
        json.dumps(
            {
                "queues": [{"name": "default", "runtime": "synthetic"}],
                "runtimes": {"synthetic": {"latency_s": latency_s}},
                "results_queue": None,
            }
        )
    )
    return path


def _server(args: argparse.Namespace, src: Path, folder: Path, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
        "SDFLEET_DATA_DIR": str(folder / "data"),
        "SDFLEET_CONFIG_FILE": str(_fleet_file(folder, args.latency_s)),
        "SDFLEET_LOG_LEVEL": "WARNING",
        "SDFLEET_API__WORKERS": str(args.workers),
    }
    cmd = [sys.executable, "-c", "from sdfleet.cli import main; main()", args.mode, "--port", str(port)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout_s} s")


def _load(url: str, requests: int, clients: int, folder: Path) -> dict[str, Any]:
    spec = folder / "request.json"
    spec.write_text(
        json.dumps(
            {
                "method": "POST",
                "path": "/v1/tasks",
                "body": BODY,
                "headers": {"Content-Type": "application/json"},
            }
        )
    )
    out = folder / f"load-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(HERE / "_load.py"), url, str(requests), str(clients), str(spec), str(out)]
    subprocess.run(cmd, check=True, timeout=600)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def one_round(args: argparse.Namespace, label: str, src: Path) -> Round:
    with tempfile.TemporaryDirectory(prefix="sdfleet-submit-") as tmp:
        folder = Path(tmp)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _server(args, src, folder, port)
        try:
            _ready(url, proc)
            if args.warmup:
                _load(url, args.warmup, args.clients, folder)
            cpu0 = cpu_seconds(proc.pid)
            got = _load(url, args.tasks, args.clients, folder)
            cpu = cpu_seconds(proc.pid) - cpu0
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    accepted = got["status"].get("202", 0)
    latency = pct(got["latency_s"])
    return Round(label, accepted, args.tasks, got["wall_s"], got["status"], latency, cpu * 1000 / args.tasks)


def arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--mode", choices=["api", "up"], default="api", help="sdfleet api (default) or sdfleet up"
    )
    ap.add_argument("--tasks", type=int, default=2000, help="measured submits per round (default 2000)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent keep-alive clients (default 16)")
    ap.add_argument("--warmup", type=int, default=200, help="submits before measuring (default 200)")
    ap.add_argument("--workers", type=int, default=2, help="API processes (SDFLEET_API__WORKERS, default 2)")
    ap.add_argument("--latency-s", type=float, default=0.05, help="synthetic runtime latency (up only)")
    ap.add_argument(
        "--src", type=Path, default=None, help="also run the server from this src dir, alternately"
    )
    ap.add_argument("--rounds", type=int, default=1, help="rounds of each (default 1)")
    ap.add_argument("--results", type=Path, default=RESULTS, help=f"JSON goes here (default {RESULTS})")
    return ap.parse_args(argv)


def _table(rounds: list[Round]) -> Table:
    table = Table("server", "accepted", "accepted/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "CPU ms/req")
    for r in rounds:
        lat = r.latency_ms
        cells = [f"{lat[k]:.1f}" for k in ("p50", "p95", "p99", "max")]
        rate = f"{r.accepted_per_s:.0f}"
        table.add_row(r.label, f"{r.accepted}/{r.requests}", rate, *cells, f"{r.cpu_ms_per_request:.2f}")
    return table


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    console = Console()
    sources = [("this checkout", SRC)] + ([(f"--src {args.src}", args.src.resolve())] if args.src else [])
    rounds = [one_round(args, label, src) for _ in range(args.rounds) for label, src in sources]
    print_table(_table(rounds), console)
    report = {
        "scenario": "submit_throughput",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rounds": [{**vars(r), "accepted_per_s": r.accepted_per_s} for r in rounds],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"submit_throughput-{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {out}")
    return 0 if all(r.accepted == r.requests for r in rounds) else 1


if __name__ == "__main__":
    raise SystemExit(main())
