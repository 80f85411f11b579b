"""How close `sdfleet simulate` comes to real agents: queue wait p50/p95 and throughput, real vs simulated.

Runs one scenario for real (redis-server, `sdfleet api`, `sdfleet agent` processes on the synthetic
runtime, started and stopped by a driver applying the simulator's KEDA/HPA rule, a scripted
arrival trace) and in the simulator, then prints both and the relative errors (target: within
15 %). See bench/_calibration.py for what is fitted and what is compared. Examples:

    python bench/simulate_calibration.py                      # 2 minutes of traffic, up to 6 agents
    python bench/simulate_calibration.py --small              # the 20-second scenario of the test
    python bench/simulate_calibration.py --latency-s 0.5 --max-replicas 4 --seed 3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from sdfleet.cli_common import print_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _calibration import COMPARED, Scenario, calibrate
from sdfleet.simulate.trace import Generator

RESULTS = Path(__file__).parent / "results"


STAGED = {"prefetch": 4, "receive_max": 10, "finish_concurrency": 4}
"""The simulated agent's shape: the real agent's defaults (on a runtime that takes one job at a
time, prefetch is 4; receives take up to 10; ``finishers`` 4 finish beside the next run)."""


def small_scenario(seed: int = 1) -> Scenario:
    """20 s: a 4-second burst from zero agents, light steady traffic, a second burst on warm agents;
    the simulated agent has the real one's default shape (prefetch 4, receives of up to 10,
    finishing beside the next run).

    Most tasks come in the first burst, so the queue wait's median falls inside its backlog's
    smooth ramp. With half the tasks in two short bursts, the median fell where one burst's waits
    (0.2-1.3 s) meet the other's (2-4.6 s), and a few tasks either way moved it by half a second.
    Scale-down waits out a 15 s stabilization, longer than the lull between the bursts: with 5 s,
    the HPA's first scale-in fell inside the second burst, where one poll's queue depth decided
    whether 3 or 4 agents met it, and real runs went both ways. The large scenario scales in and
    out for real."""
    bursts = [{"at_s": 0, "duration_s": 4, "rate": 30}, {"at_s": 14, "duration_s": 2, "rate": 20}]
    workload = Generator.model_validate({"duration_s": 20, "rate": 2, "bursts": bursts, "seed": seed})
    scn = Scenario(workload=workload, agent=dict(STAGED))
    scn.keda = scn.keda.model_copy(
        update={"scale_down": scn.keda.scale_down.model_copy(update={"stabilization_s": 15.0})}
    )
    return scn


def large_scenario(args: argparse.Namespace) -> Scenario:
    """A ramp up and down over ``duration`` s with two bursts: scale from zero, up, in, and up again."""
    d = args.duration_s
    bursts = [
        {"at_s": 0.1 * d, "duration_s": 0.05 * d, "rate": 3 * args.rate},
        {"at_s": 0.6 * d, "duration_s": 0.05 * d, "rate": 4 * args.rate},
    ]
    diurnal = {"peak_to_mean": 1.8, "period_s": d, "peak_at_s": 0.4 * d}
    workload = Generator.model_validate(
        {"duration_s": d, "rate": args.rate, "diurnal": diurnal, "bursts": bursts, "seed": args.seed}
    )
    scn = Scenario(
        workload=workload,
        latency_s=args.latency_s,
        max_replicas=args.max_replicas,
        target_backlog=args.target_backlog,
        timeout_s=d + 120,
        agent=dict(STAGED),
    )
    # Hold replicas through short lulls: on a busy machine an agent takes 5-25 s to start, and
    # scaling in and out every few seconds makes the run hinge on exactly when each start lands.
    scn.keda = scn.keda.model_copy(
        update={
            "cooldown_s": 30.0,
            "scale_down": scn.keda.scale_down.model_copy(update={"stabilization_s": 30.0}),
        }
    )
    return scn


def table(report: dict[str, Any]) -> Table:
    t = Table("", "real", "simulated", "error", title=f"simulate_calibration: {report['tasks']} tasks")
    for key, real in report["real"].items():
        sim = report["sim"][key]
        err = f"{report['errors'][key] * 100:+.1f} %" if key in report["errors"] else ""
        t.add_row(key, f"{real:.3f}", f"{sim:.3f}", err)
    return t


def arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="the 20-second scenario of the test")
    ap.add_argument("--duration-s", type=float, default=120.0)
    ap.add_argument("--rate", type=float, default=6.0, help="mean requests/s")
    ap.add_argument("--latency-s", type=float, default=0.25, help="the synthetic runtime's latency")
    ap.add_argument("--max-replicas", type=int, default=6)
    ap.add_argument("--target-backlog", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument(
        "--agent-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment of the real agents, e.g. SDFLEET_AGENT__PREFETCH=4 (repeatable)",
    )
    ap.add_argument(
        "--sim-agent",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="the simulated agent's shape to match, e.g. prefetch=4, finish_concurrency=4 (repeatable)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    scn = small_scenario(args.seed) if args.small else large_scenario(args)
    scn.agent_env = dict(item.split("=", 1) for item in args.agent_env)
    scn.agent |= {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.sim_agent)}
    began = time.perf_counter()
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = calibrate(scn, keep=args.results / f"simulate_calibration-{stamp}-real.json")

    report |= {
        "scenario": "simulate_calibration",
        "settings": {
            "small": args.small,
            **{k: v for k, v in vars(args).items() if k not in ("small", "results")},
        },
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "run_s": time.perf_counter() - began,
    }
    print_table(table(report), Console())
    out = args.results / f"simulate_calibration-{stamp}.json"

    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
    return 0 if all(abs(report["errors"][k]) <= args.tolerance for k in COMPARED) else 1


if __name__ == "__main__":
    sys.exit(main())
