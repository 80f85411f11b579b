"""The fleet's own overhead and throughput: API + agents on the synthetic runtime, real HTTP clients.

Starts an engine (embedded SQLite by default; ``--engine redis`` starts a redis-server, ``--engine aws``
a moto_server, both on 127.0.0.1 free ports and stopped by PID at the end; or give URLs), a fleet
process (API + ``--agents`` agents on one queue, one event loop, like ``sdfleet up``) whose runtime
sleeps ``--latency-s`` per task, then submits ``--tasks`` text-to-image tasks to ``POST /v1/tasks``
with ``--concurrency`` clients and waits for all of them. Prints a table; writes JSON to
``bench/results/fleet_throughput-<engine>-<timestamp>.json``. Examples:

    python bench/fleet_throughput.py                            # sqlite, 500 tasks, 2 agents
    python bench/fleet_throughput.py --engine redis --agents 4
    python bench/fleet_throughput.py --engine aws               # moto: not AWS's latencies
    python bench/fleet_throughput.py --rate 20                  # open loop at 20 tasks/s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Table

from sdfleet.cli_common import print_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fleet import QUEUE, FleetProcess, bench_settings, open_engine

RESULTS = Path(__file__).parent / "results"
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Run:
    """What the clients saw: per task the submit time and latency; e2e of the polled sample."""

    args: argparse.Namespace
    http: httpx.AsyncClient
    bar: Progress
    submitted_bar: TaskID
    sent: dict[str, float] = field(default_factory=dict)
    submit_s: list[float] = field(default_factory=list)
    submit_errors: list[str] = field(default_factory=list)
    polled: dict[str, tuple[float, float]] = field(default_factory=dict)
    """task id → (sent, seen terminal) of the tasks polled like a client."""
    pollers: list[asyncio.Task[None]] = field(default_factory=list)
    views: dict[str, dict[str, Any]] = field(default_factory=dict)


def pct(values: list[float]) -> dict[str, float]:
    """Nearest-rank percentiles (so p50 ≤ p95 ≤ p99 ≤ max always holds)."""
    if not values:
        return {"n": 0}
    s = sorted(values)

    def rank(q: float) -> float:
        return s[max(0, math.ceil(q * len(s)) - 1)]

    return {"n": len(s), "mean": sum(s) / len(s), "p50": rank(0.5), "p95": rank(0.95), "p99": rank(0.99)} | {
        "max": s[-1]
    }


async def _submit_one(run: Run, i: int) -> None:
    a = run.args
    params = {"prompt": f"bench {i}", "steps": 1, "width": a.size, "height": a.size, "seed": i}
    sent = time.time()
    t0 = time.perf_counter()
    r = await run.http.post("/v1/tasks", json={"params": params})
    if r.status_code != 202:
        run.submit_errors.append(f"{r.status_code}: {r.text[:200]}")
        return
    run.submit_s.append(time.perf_counter() - t0)
    task_id = r.json()["id"]
    run.sent[task_id] = sent
    if i % max(1, a.tasks // max(1, a.poll_sample)) == 0 and len(run.pollers) < a.poll_sample:
        run.pollers.append(asyncio.create_task(_poll(run, task_id, sent)))


async def _submitter(run: Run, queue: asyncio.Queue[int], t0: float) -> None:
    while not queue.empty():
        i = queue.get_nowait()
        if run.args.rate > 0:
            await asyncio.sleep(max(0.0, t0 + i / run.args.rate - time.monotonic()))
        await _submit_one(run, i)
        run.bar.advance(run.submitted_bar)


async def _poll(run: Run, task_id: str, sent: float) -> None:
    """A client's view: ``GET /v1/tasks/{id}`` every ``--poll-s`` until it has finished."""
    deadline = time.monotonic() + run.args.timeout_s
    while time.monotonic() < deadline:
        r = await run.http.get(f"/v1/tasks/{task_id}")
        if r.status_code == 200 and r.json()["state"] in TERMINAL:
            run.polled[task_id] = (sent, time.time())
            return
        await asyncio.sleep(run.args.poll_s)


async def submit_all(run: Run) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(run.args.tasks):
        queue.put_nowait(i)
    t0 = time.monotonic()
    await asyncio.gather(*(_submitter(run, queue, t0) for _ in range(run.args.concurrency)))


async def _remaining(run: Run) -> int:
    r = await run.http.get("/v1/queues")
    q = next(q for q in r.json() if q["name"] == QUEUE)
    return int(q["visible"] + q["in_flight"] + q["delayed"])


async def _collect(run: Run) -> None:
    sem = asyncio.Semaphore(run.args.concurrency)

    async def one(task_id: str) -> None:
        async with sem:
            view = (await run.http.get(f"/v1/tasks/{task_id}")).json()
        if view.get("state") in TERMINAL:
            run.views[task_id] = view

    await asyncio.gather(*(one(t) for t in run.sent if t not in run.views))


async def wait_done(run: Run, done_bar: TaskID) -> None:
    """Until every accepted task is terminal: queue depth for the bar, then the records themselves."""
    deadline = time.monotonic() + run.args.timeout_s
    while time.monotonic() < deadline:
        left = await _remaining(run)
        run.bar.update(done_bar, completed=max(0, len(run.sent) - left))
        if left == 0:
            await _collect(run)
            if len(run.views) == len(run.sent):
                run.bar.update(done_bar, completed=len(run.sent))
                return
        await asyncio.sleep(0.2)
    await _collect(run)


async def drive(url: str, args: argparse.Namespace, console: Console) -> Run:
    limits = httpx.Limits(max_connections=args.concurrency + args.poll_sample + 2)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        with Progress(console=console, disable=args.no_progress) as bar:
            run = Run(args, http, bar, submitted_bar=bar.add_task("submitted", total=args.tasks))
            done = bar.add_task("finished", total=args.tasks)
            await submit_all(run)
            bar.update(done, total=len(run.sent))
            await wait_done(run, done)
            for poller in run.pollers:  # done within a poll period, unless the run timed out
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(poller, timeout=max(1.0, 3 * args.poll_s))
        return run


def latencies(run: Run, ok: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Seconds, as percentiles: from the clients' clocks and from the task records (same machine)."""
    lat = run.args.latency_s
    e2e = [v["finished_at"] - v["created_at"] for v in ok]
    qwait = [v["timings"].get("queue_wait", 0.0) for v in ok]
    polled = [(t, sent, seen) for t, (sent, seen) in run.polled.items() if t in run.views]
    return {
        "submit": pct(run.submit_s),
        "e2e_record": pct(e2e),
        "e2e_poll": pct([seen - sent for _, sent, seen in polled]),
        "poll_lag": pct([seen - run.views[t]["finished_at"] for t, _, seen in polled]),
        "queue_wait": pct(qwait),
        "start_wait": pct([v["started_at"] - v["created_at"] for v in ok]),
        "runtime_run": pct([v["timings"].get("runtime_run", 0.0) for v in ok]),
        "overhead": pct([e - lat - q for e, q in zip(e2e, qwait, strict=True)]),
        "overhead_after_start": pct([v["finished_at"] - v["started_at"] - lat for v in ok]),
    }


def summarize(run: Run, engine: str, wall_s: float) -> dict[str, Any]:
    a = run.args
    ok = [v for v in run.views.values() if v["state"] == "succeeded"]
    span = max(v["finished_at"] for v in ok) - min(v["created_at"] for v in ok) if ok else 0.0
    ideal = a.agents / a.latency_s
    tps = len(ok) / span if span > 0 else 0.0
    return {
        "scenario": "fleet_throughput",
        "engine": engine,
        "settings": {k: getattr(a, k) for k in ("tasks", "agents", "latency_s", "concurrency", "rate")}
        | {k: getattr(a, k) for k in ("size", "prefetch", "poll_sample", "poll_s")},
        "machine": machine(),
        "wall_s": wall_s,
        "tasks": {
            "submitted": a.tasks,
            "accepted": len(run.sent),
            "submit_errors": len(run.submit_errors),
            "succeeded": len(ok),
            "failed": sum(v["state"] != "succeeded" for v in run.views.values()),
            "incomplete": len(run.sent) - len(run.views),
        },
        "throughput": {"tasks_per_s": tps, "ideal_tasks_per_s": ideal, "efficiency": tps / ideal},
        "latency_s": latencies(run, ok),
        "submit_error_samples": run.submit_errors[:5],
    }


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()}


def table(report: dict[str, Any]) -> Table:
    t, s = report["tasks"], report["settings"]
    tp = report["throughput"]
    title = (
        f"{report['engine']}: {t['succeeded']}/{t['submitted']} succeeded, {s['agents']} agents × "
        f"{s['latency_s']} s, {s['concurrency']} clients — {tp['tasks_per_s']:.1f} tasks/s "
        f"(ideal {tp['ideal_tasks_per_s']:.1f}, {100 * tp['efficiency']:.0f} %)"
    )
    out = Table("latency (ms)", "n", "p50", "p95", "p99", "max", title=title)
    for name, p in report["latency_s"].items():
        if p["n"]:
            out.add_row(name, str(p["n"]), *(f"{1000 * p[k]:.1f}" for k in ("p50", "p95", "p99", "max")))
    return out


def arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("sqlite", "redis", "aws"), default="sqlite")
    ap.add_argument("--bus-url", help="use this bus instead of starting one (redis://…, aws://…)")
    ap.add_argument("--store-url", help="task store (default: the bus URL)")
    ap.add_argument("--storage-url", help="image storage (default: file:// in a temp dir; s3:// on aws)")
    ap.add_argument("--agents", type=int, default=2, help="agents on the one queue (default 2)")
    ap.add_argument("--latency-s", type=float, default=0.05, help="synthetic runtime latency per task")
    ap.add_argument("--tasks", type=int, help="tasks to submit (default 500; 200 on aws: moto is slow)")
    ap.add_argument("--concurrency", type=int, default=8, help="HTTP clients submitting in parallel")
    ap.add_argument("--rate", type=float, default=0.0, help="submits per second (0: as fast as possible)")
    ap.add_argument("--size", type=int, default=64, help="image width and height (PNG encode + store)")
    ap.add_argument("--prefetch", type=int, default=1, help="tasks an agent prepares ahead (default 1)")
    ap.add_argument("--poll-sample", type=int, default=20, help="tasks also polled like a client would")
    ap.add_argument("--poll-s", type=float, default=0.05, help="poll period of those tasks")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="give up waiting after this long")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--results", type=Path, default=RESULTS, help=f"JSON goes here (default {RESULTS})")
    args = ap.parse_args(argv)
    if args.tasks is None:
        args.tasks = 200 if args.engine == "aws" and args.bus_url is None else 500
    return args


async def run_bench(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    urls = {"bus": args.bus_url, "store": args.store_url, "storage": args.storage_url}
    with tempfile.TemporaryDirectory(prefix="sdfleet-bench-") as tmp:
        workdir = Path(tmp)
        engine = open_engine(args.engine, workdir, urls)
        fleet = FleetProcess(
            bench_settings(engine, workdir, args.latency_s, prefetch=args.prefetch),
            args.agents,
            engine,
            workdir / "fleet.log",
        )
        try:
            await fleet.start()
            began = time.monotonic()
            run = await drive(fleet.url, args, console)
            return summarize(run, engine.name, time.monotonic() - began)
        except BaseException:
            fleet.stop()
            console.print(f"fleet log:\n{fleet.log_path.read_text()[-4000:]}")
            raise
        finally:
            fleet.stop()
            engine.close()


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    console = Console()
    report = asyncio.run(run_bench(args, console))
    print_table(table(report), console)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"fleet_throughput-{report['engine']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {out}")
    t = report["tasks"]
    return 0 if t["succeeded"] == t["submitted"] else 1


if __name__ == "__main__":
    sys.exit(main())
