"""How busy one agent keeps its runtime under a backlog, per engine, and the engine calls per task.

The runtime is the synthetic one with a fixed latency per task under one lock, like one GPU. For
each engine (sqlite, redis: a redis-server, aws: a moto_server, all started here on 127.0.0.1)
and each latency, ``--tasks`` tasks are put on the queue as the API does, then one agent drains
it in burst mode. ``busy`` = tasks × latency / wall, where wall runs from the first task's start to
the last one's finish in the records; ``overhead`` = wall / tasks − latency. Runs are interleaved
(engine × latency, ``--repeat`` times) and the median is reported. Calls are counted on the engines
the agent sees (bus, store, storage), divided by the tasks.

    python bench/agent_busy.py                                 # all engines, 200 and 50 ms
    python bench/agent_busy.py --engines redis --latencies-ms 50 --tasks 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from sdfleet.cli_common import print_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _agent import ENGINES, backlog_run, engine_for, now_tag, settings_for, text_tasks

RESULTS = Path(__file__).parent / "results"


async def one_run(kind: str, latency_ms: float, n: int, workdir: Path) -> dict[str, Any]:
    engine = engine_for(kind, workdir)
    try:
        options = {"latency_s": latency_ms / 1000, "progress_steps": 1}
        settings = settings_for(engine, workdir, "synthetic", options, {})
        run = await backlog_run(settings, engine, text_tasks(n, 64))
    finally:
        engine.close()
    latency = latency_ms / 1000
    return {
        "engine": kind,
        "latency_ms": latency_ms,
        "tasks": n,
        "succeeded": run.states.get("succeeded", 0),
        "wall_s": round(run.wall_s, 3),
        "busy": round(n * latency / run.wall_s, 4),
        "overhead_ms": round((run.wall_s / n - latency) * 1000, 2),
        "calls_per_task": {k: v for k, v in run.per_task().items() if not k.startswith("aws.")},
        "aws_api_calls_per_task": {k[4:]: v for k, v in run.per_task().items() if k.startswith("aws.")},
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = dict(runs[0])
    for key in ("wall_s", "busy", "overhead_ms"):
        best[key] = round(statistics.median(r[key] for r in runs), 4)
    best["runs"] = len(runs)
    best["succeeded"] = min(r["succeeded"] for r in runs)
    return best


def table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="one agent under a backlog (synthetic runtime, one lock)")
    for col in ("engine", "latency", "tasks", "ok", "busy", "overhead/task", "engine calls/task"):
        t.add_column(col, justify="right" if col not in ("engine", "engine calls/task") else "left")
    for r in rows:
        calls = r["calls_per_task"]
        total = round(sum(calls.values()), 2)
        t.add_row(
            r["engine"],
            f"{r['latency_ms']:g} ms",
            str(r["tasks"]),
            str(r["succeeded"]),
            f"{r['busy']:.3f}",
            f"{r['overhead_ms']:.1f} ms",
            f"{total}: " + ", ".join(f"{k} {v:g}" for k, v in calls.items()),
        )
    return t


def arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--latencies-ms", nargs="+", type=float, default=[200.0, 50.0])
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--results", type=Path, default=RESULTS)
    return ap.parse_args(argv)


async def run_all(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
    plan = [(k, lat) for _ in range(args.repeat) for k in args.engines for lat in args.latencies_ms]
    with Progress(console=console, transient=True) as bar:
        job = bar.add_task("runs", total=len(plan))
        for kind, latency in plan:
            with tempfile.TemporaryDirectory(prefix="sdfleet-busy-") as tmp:
                runs.setdefault((kind, latency), []).append(
                    await one_run(kind, latency, args.tasks, Path(tmp))
                )
            bar.advance(job)
    return [median_of(v) for v in runs.values()]


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    console = Console()
    rows = asyncio.run(run_all(args, console))
    print_table(table(rows), console)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"agent_busy-{now_tag()}.json"
    report = {
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {out}")
    return 0 if all(r["succeeded"] == r["tasks"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
