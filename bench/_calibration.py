"""Calibrating ``sdfleet simulate`` against the real agent: one scenario, run for real and simulated.

For real (``_calibration_run``): a ``redis-server``, ``sdfleet api`` and ``sdfleet agent``
processes on the ``synthetic`` runtime (a known latency), a scripted arrival trace posted to
``POST /v1/tasks``, and a driver applying the simulator's own KEDA/HPA rule to the queue's depth
read from the bus, starting agents and stopping the newest with SIGTERM, as a ReplicaSet would.

Then the simulator runs what the queue received (each task at its ``202 Accepted``) with the same
rule and two things measured in the run: the agents' time per task beyond the runtime's latency
(their mean gap between two tasks started back to back, per agent) and their start times (spawn to
ready file). What is compared is what the fit does not set: queue wait percentiles (publish →
receive) and throughput.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _calibration_run import QUEUE, Real, Scenario, dump, load, run_real
from sdfleet.simulate.engine import simulate
from sdfleet.simulate.params import SimParams
from sdfleet.simulate.perf import DEFAULT_POINTS, PerfTable
from sdfleet.simulate.pricing import DEFAULT_PRICES
from sdfleet.simulate.report import summary
from sdfleet.simulate.trace import Arrivals, TaskClass
from sdfleet.tasks import TaskRecord

__all__ = ["COMPARED", "QUEUE", "Real", "Scenario", "calibrate", "dump", "load", "run_real"]


WAIT_STAGES = ("queue_wait", "inputs_fetch", "pool_wait", "runtime_wait")
"""The simulator's queue wait runs from arrival to the run's start. The staged agent receives ahead
(prefetch) and hands the runtime its next job while one runs (``max_in_flight``), so in its records
that is the queue wait (to the receive), preparing, the wait in its ready pool and the wait at the
runtime behind the job before."""


def _wait(r: TaskRecord) -> float:
    return sum(r.result.timings.get(k, 0.0) for k in WAIT_STAGES) if r.result is not None else 0.0


def _received(r: TaskRecord) -> float:
    """Enqueue → the agent's receive."""
    return r.result.timings.get("queue_wait", 0.0) if r.result is not None else 0.0


def _cycles(real: Real, latency_s: float) -> tuple[float, list[float | None]]:
    """The agents' mean time from one task's start to the next when back to back (within 3 × the
    median gap; longer ones are an agent waiting for work): over all agents, and per agent in the
    order they started work (the order the simulation starts them; None: too few tasks)."""
    by_worker: dict[str, list[float]] = {}
    for r in real.records:
        if r.started_at is not None and r.worker:
            by_worker.setdefault(r.worker, []).append(r.started_at)

    def back_to_back(gaps: list[float]) -> list[float]:
        return [g for g in gaps if g <= 3 * statistics.median(gaps)] if gaps else []

    per_agent: list[float | None] = []
    every: list[float] = []
    for starts in sorted(by_worker.values(), key=min):
        gaps = [b - a for a, b in itertools.pairwise(sorted(starts))]
        every += gaps
        own = back_to_back(gaps)
        per_agent.append(statistics.mean(own) if len(own) >= 3 else None)
    busy = back_to_back(every)
    return (statistics.mean(busy) if busy else latency_s), per_agent


def _starts(real: Real) -> tuple[float, list[float]]:
    """Each agent's spawn → ready, in spawn order (one stopped before it was ready: the mean)."""
    spawned = {n: t for t, kind, n in real.events if kind == "spawn"}
    ready = {n: t for t, kind, n in real.events if kind == "ready"}
    mean = statistics.mean(real.start_s) if real.start_s else 2.0
    return mean, [ready[n] - spawned[n] if n in ready else mean for n in sorted(spawned)]


def fit(real: Real, scn: Scenario) -> dict[str, Any]:
    """Simulation parameters measured on the run, on the agent shape ``scn.agent`` says: the
    agents' time per task beyond the runtime's latency, and their start times. Today's agent
    finishes a task before the next starts, so that time is serial finishing (``finish_s``, per
    replica); a staged agent (``finish_concurrency`` > 0) finishes beside the next run, so it is
    the run's own overhead, and finishing is what follows the run in each record."""
    latency = scn.latency_s
    cycle, per_agent = _cycles(real, latency)
    idle = [r for r in real.records if r.result is not None and _wait(r) < latency / 2]
    prepare = [r.started_at - r.task.created_at - _received(r) for r in idle if r.started_at is not None]
    agent: dict[str, Any] = {
        "receive_s": statistics.median(_received(r) for r in idle) if idle else 0.002,
        "prepare_s": max(0.0, statistics.median(prepare)) if prepare else 0.003,
        "model_load_s": 0.0,
    }
    if scn.agent.get("finish_concurrency", 0) > 0:
        # after the runtime call (its wait behind the job before, switch and run) ends
        call = ("runtime_wait", "model_download", "model_switch", "runtime_run")
        after = [
            r.finished_at - r.started_at - sum(r.result.timings.get(k, 0.0) for k in call)
            for r in real.records
            if r.finished_at and r.started_at and r.result is not None
        ]
        agent |= {"run_overhead_s": max(0.0, cycle - latency), "finish_s": max(0.0, statistics.median(after))}
    else:
        agent |= {
            "finish_s": max(0.0, cycle - latency),
            "finish_s_samples": [max(0.0, (c or cycle) - latency) for c in per_agent],
        }
    mean_start, starts = _starts(real)
    return {
        "agent": agent | scn.agent,
        "nodes": {"enabled": False, "pod_start_s": mean_start, "pod_start_samples": starts},
    }


def published(real: Real) -> Arrivals:
    """The trace as the queue received it: each task at its ``202 Accepted`` (the API answers
    after publishing), from the trace's start. On a loaded machine the API lags the script, and
    this, not the script, is what the simulation must replay."""
    t = np.sort(np.asarray([real.accepted.get(r.id, r.task.created_at - real.t0) for r in real.records]))
    cls = TaskClass(None, 64, 64, 1, "default", "standard")
    return Arrivals([cls], t, np.zeros(len(t), np.int32), np.ones(len(t), np.int64))


def run_sim(scn: Scenario, fitted: dict[str, Any], arrivals: Arrivals) -> dict[str, Any]:
    params = SimParams.model_validate(
        {"keda": scn.keda.model_dump(), "resolution_s": 0.0, "drain_after_s": 600.0, **fitted}
    )
    result = simulate(
        scn.fleet(), arrivals, params, perf=PerfTable(DEFAULT_POINTS), price=DEFAULT_PRICES["h200"], dt=0.0
    )
    return summary(result)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, -(-int(q * len(s) * 1000) // 1000) - 1)] if s else 0.0


def api_lag(real: Real) -> dict[str, float]:
    """``202 Accepted`` minus the trace's time: how far the API fell behind the script."""
    lag = [real.accepted[r.id] - (r.task.created_at - real.t0) for r in real.records if r.id in real.accepted]
    return {"p50": _pct(lag, 0.5), "p95": _pct(lag, 0.95)} if lag else {}


def measured(real: Real) -> dict[str, float]:
    ok = [r for r in real.records if r.finished_at is not None]
    waits = [_wait(r) for r in ok]
    e2e = [r.finished_at - r.task.created_at for r in ok if r.finished_at is not None]
    span = max(r.finished_at for r in ok if r.finished_at) - min(r.task.created_at for r in ok)
    return {
        "wait_p50": _pct(waits, 0.5),
        "wait_p95": _pct(waits, 0.95),
        "e2e_p50": _pct(e2e, 0.5),
        "e2e_p95": _pct(e2e, 0.95),
        "throughput": len(ok) / span,
        "peak_replicas": float(max((n for _, n in real.replicas), default=0)),
    }


def simulated(s: dict[str, Any], arrivals: Arrivals) -> dict[str, float]:
    q = s["queues"][QUEUE]
    return {
        "wait_p50": q["queue_wait_s"]["p50"],
        "wait_p95": q["queue_wait_s"]["p95"],
        "e2e_p50": q["e2e_s"]["p50"],
        "e2e_p95": q["e2e_s"]["p95"],
        "throughput": q["completed"] / (q["last_finished_s"] - float(arrivals.t[0])),
        "peak_replicas": float(q["replicas"]["peak"]),
    }


COMPARED = ("wait_p50", "wait_p95", "throughput")


def calibrate(scn: Scenario, workdir: Path | None = None, keep: Path | None = None) -> dict[str, Any]:
    """Run ``scn`` for real and simulated; the figures side by side, relative errors of ``COMPARED``.
    ``keep``: also write the real run there (``dump``)."""
    with tempfile.TemporaryDirectory(prefix="sdfleet-calib-") as tmp:
        real = asyncio.run(run_real(scn, workdir or Path(tmp)))
    if keep is not None:
        dump(real, keep)
    fitted = fit(real, scn)

    arrivals = published(real)
    sim = run_sim(scn, fitted, arrivals)
    m, p = measured(real), simulated(sim, arrivals)

    errors = {k: (p[k] - m[k]) / m[k] if m[k] else float("inf") for k in COMPARED}
    return {
        "real": m,
        "sim": p,
        "errors": errors,
        "api_lag_s": api_lag(real),
        "fitted": fitted,
        "tasks": len(real.records),
        "agents_started": len(real.start_s),
        "wall_s": real.wall_s,
    }
