"""What a run found: a JSON-ready summary, a table, and the settings in chart-values shape."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from sdfleet.simulate.engine import QueueRun, Result
from sdfleet.simulate.params import KedaParams, NodeParams, Rules
from sdfleet.simulate.stats import Hist


def _rules(r: Rules) -> dict[str, Any]:
    out: dict[str, Any] = {
        "stabilizationWindowSeconds": round(r.stabilization_s),
        "policies": [
            {"type": p.type, "value": p.value, "periodSeconds": round(p.period_s)} for p in r.policies
        ],
    }
    if r.select != "Max":  # Kubernetes' default
        out["selectPolicy"] = r.select
    return out


def chart_scaling(k: KedaParams, *, minimum: int, maximum: int, target: float) -> dict[str, Any]:
    """A queue's settings as the chart's ``queues[].scaling`` (what ``deploy values`` takes)."""
    behavior = {"scaleUp": _rules(k.scale_up), "scaleDown": _rules(k.scale_down)}
    return {
        "minReplicaCount": minimum,
        "maxReplicaCount": maximum,
        "targetBacklog": round(target),
        "activationBacklog": k.activation,
        "scaleOnInFlight": k.scale_on_in_flight,
        "pollingInterval": max(1, round(k.polling_s)),
        "cooldownPeriod": round(k.cooldown_s),
        "behavior": behavior,
    }


def chart_karpenter(n: NodeParams, gpu_class: str = "gpu") -> dict[str, Any]:
    return {
        "gpuClasses": {
            gpu_class: {
                "consolidateAfter": f"{round(n.consolidate_after_s)}s",
                "onDemandFallback": n.on_demand_fallback,
            }
        }
    }


def chart_settings(result: Result) -> dict[str, Any]:
    """``{queues: {name: scaling}, karpenter: ...}``: the simulated settings, for ``deploy values``."""
    queues = {
        name: chart_scaling(
            run.keda, minimum=run.scaler.min, maximum=run.scaler.max, target=run.scaler.target
        )
        for name, run in result.queues.items()
    }
    return {"queues": queues, "karpenter": chart_karpenter(result.params.nodes)}


def _lat(wait: Hist, e2e: Hist) -> dict[str, Any]:
    return {"queue_wait_s": wait.summary(), "e2e_s": e2e.summary()}


def _queue(result: Result, run: QueueRun) -> dict[str, Any]:
    c, dep, q = result.counters, run.deployment, run.queue
    tiers = sorted(set(run.wait) | set(run.e2e))
    return {
        "arrived": c.get(run.name, "arrived"),
        "completed": c.get(run.name, "completed"),
        "last_finished_s": run.windows.last_at,
        "left": q.visible + q.in_flight,
        "dead_lettered": q.dead,
        "expired": q.expired,
        **_lat(Hist.merged(list(run.wait.values())), Hist.merged(list(run.e2e.values()))),
        "tiers": {t: _lat(run.wait.get(t, Hist()), run.e2e.get(t, Hist())) for t in tiers},
        "replicas": {
            "peak": dep.peak,
            "mean": dep.ready_seconds() / result.horizon_s,
            "cold_starts": c.get(run.name, "cold_starts"),
            "cold_start_s": dep.cold_start.summary(),
        },
        "switches": c.get(run.name, "switches"),
        "retried": q.redelivered,
        "interrupted": c.get(run.name, "interrupted"),
        "lost_with_node": c.get(run.name, "lost"),
        "gpu_busy_s": c.get(run.name, "gpu_busy_s"),
    }


def summary(result: Result) -> dict[str, Any]:
    c = result.counters
    spot_h, od_h = c.get("_cluster", "gpu_hours_spot"), c.get("_cluster", "gpu_hours_on-demand")
    cost = c.get("_cluster", "cost_spot") + c.get("_cluster", "cost_on-demand")
    tiers = sorted({t for run in result.queues.values() for t in (*run.wait, *run.e2e)})
    images = sum(
        c.get(name, "completed") for name in result.queues
    )  # requests; images per request are in the classes
    return {
        "horizon_s": result.horizon_s,
        "resolution_s": result.resolution_s,
        "wall_s": result.wall_s,
        "arrived": result.arrived,
        "refused_no_route": c.get("_refused", "no_route"),
        "queues": {name: _queue(result, run) for name, run in result.queues.items()},
        "tiers": {
            t: _lat(
                Hist.merged([r.wait[t] for r in result.queues.values() if t in r.wait]),
                Hist.merged([r.e2e[t] for r in result.queues.values() if t in r.e2e]),
            )
            for t in tiers
        },
        "nodes": {
            "gpu": result.params.nodes.gpu,
            "gpu_hours": {"spot": spot_h, "on_demand": od_h, "total": spot_h + od_h},
            "cost_usd": {
                "spot": c.get("_cluster", "cost_spot"),
                "on_demand": c.get("_cluster", "cost_on-demand"),
                "total": cost,
                "per_1000_requests": cost / images * 1000 if images else None,
            },
            "price_per_gpu_hour": {"on_demand": result.price.on_demand, "spot": result.price.spot_price},
            "launched": {
                "spot": c.get("_cluster", "launched_spot"),
                "on_demand": c.get("_cluster", "launched_on-demand"),
            },
            "spot_fallbacks": c.get("_cluster", "spot_fallbacks"),
            "interruptions": c.get("_cluster", "interruptions"),
        },
        "settings": chart_settings(result),
        "params": result.params.model_dump(mode="json"),
    }


def _fmt(s: dict[str, float]) -> str:
    if not s.get("n"):
        return "-"
    return " / ".join(_sec(s[k]) for k in ("p50", "p95", "p99"))


def _sec(v: float) -> str:
    return f"{v * 1000:.0f}ms" if v < 1 else f"{v:.1f}s" if v < 100 else f"{v:.0f}s"


def table(s: dict[str, Any]) -> Table:
    t = Table(
        "queue",
        "tier",
        "requests",
        "queue wait p50/p95/p99",
        "e2e p50/p95/p99",
        "replicas peak/mean",
        "cold starts",
        "switches",
        "retried",
        title=f"sdfleet simulate: {s['horizon_s']:.0f} s simulated in {s['wall_s']:.1f} s",
    )
    for name, q in s["queues"].items():
        rep = q["replicas"]
        expired = f", {q['expired']:.0f} expired" if q["expired"] else ""  # past the queue's ttl_s
        peak_mean = f"{rep['peak']} / {rep['mean']:.2f}"
        t.add_row(
            name,
            "all",
            f"{q['completed']:.0f}/{q['arrived']:.0f}{expired}",
            _fmt(q["queue_wait_s"]),
            _fmt(q["e2e_s"]),
            peak_mean,
            f"{rep['cold_starts']:.0f}",
            f"{q['switches']:.0f}",
            f"{q['retried']:.0f}",
        )
        if len(q["tiers"]) > 1:
            for tier, lat in q["tiers"].items():
                t.add_row("", tier, "", _fmt(lat["queue_wait_s"]), _fmt(lat["e2e_s"]), "", "", "", "")
    n = s["nodes"]
    h, cost = n["gpu_hours"], n["cost_usd"]
    t.caption = (
        f"{n['gpu']}: {h['total']:.1f} GPU-hours ({h['spot']:.1f} spot, {h['on_demand']:.1f} on-demand), "
        f"${cost['total']:.2f}; {n['interruptions']:.0f} spot interruptions, "
        f"{n['spot_fallbacks']:.0f} on-demand fallbacks"
    )
    return t
