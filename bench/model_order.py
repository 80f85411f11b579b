"""Model switches on a queue that mixes models (the seed's dynamic queue): FIFO vs model-aware order.

One agent, the synthetic runtime with ``--latency-ms`` per task and ``--switch-ms`` per model
switch, a backlog of ``--tasks`` tasks over ``--models`` models in random order, on the embedded
SQLite engine. FIFO is ``affinity_max_wait_s = 0``; model-aware prefers the loaded model's tasks
among the ``--prefetch`` received, none passed over longer than ``--bound-s``. Reports switches
per 1,000 tasks, wall time, and the longest time a task waited in the agent's ready pool.

    python bench/model_order.py --tasks 1000 --models 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sdfleet.cli_common import print_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _agent import backlog_run, engine_for, now_tag, settings_for, text_tasks

RESULTS = Path(__file__).parent / "results"


async def one(order: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    models = [f"model-{m}" for m in range(args.models)]
    picks = [rng.choice(models) for _ in range(args.tasks)]
    with tempfile.TemporaryDirectory(prefix="sdfleet-order-") as tmp:
        engine = engine_for("sqlite", Path(tmp))
        options = {"latency_s": args.latency_ms / 1000, "switch_latency_s": args.switch_ms / 1000}
        bound = 0.0 if order == "fifo" else args.bound_s
        agent = {"prefetch": args.prefetch, "affinity_max_wait_s": bound}
        settings = settings_for(engine, Path(tmp), "synthetic", options | {"progress_steps": 1}, agent)
        run = await backlog_run(settings, engine, text_tasks(args.tasks, 64, lambda i: picks[i]))
        engine.close()
    pool_waits = [
        r.started_at - r.task.created_at - r.result.timings.get("queue_wait", 0.0)
        for r in run.records
        if r.started_at and r.result
    ]
    return {
        "order": order,
        "tasks": args.tasks,
        "succeeded": run.states.get("succeeded", 0),
        "switches": run.switches,
        "switches_per_1000": round(run.switches * 1000 / args.tasks, 1),
        "wall_s": round(run.wall_s, 2),
        "max_pool_wait_s": round(max(pool_waits), 2),
    }


def arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--latency-ms", type=float, default=5.0)
    ap.add_argument("--switch-ms", type=float, default=20.0)
    ap.add_argument("--prefetch", type=int, default=16)
    ap.add_argument("--bound-s", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--results", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    console = Console()
    rows = [asyncio.run(one(order, args)) for order in ("fifo", "model-aware")]
    t = Table(title=f"{args.tasks} tasks over {args.models} models, prefetch {args.prefetch}")
    for col in ("order", "ok", "switches", "per 1,000", "wall", "longest wait in pool"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            r["order"],
            str(r["succeeded"]),
            str(r["switches"]),
            f"{r['switches_per_1000']:g}",
            f"{r['wall_s']:.1f} s",
            f"{r['max_pool_wait_s']:.2f} s",
        )
    print_table(t, console)
    ratio = rows[1]["switches"] / max(1, rows[0]["switches"])
    console.print(f"model-aware / FIFO switches: {ratio:.3f} (bound {args.bound_s:g} s)")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"model_order-{now_tag()}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    console.print(f"wrote {out}")
    return 0 if all(r["succeeded"] == r["tasks"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
