"""Whole simulations, small: one replica by hand, scaling, spot interruptions, fallback, modes, routing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from sdfleet.settings import FleetConfig
from sdfleet.simulate.engine import Result, simulate
from sdfleet.simulate.params import SimParams
from sdfleet.simulate.perf import DEFAULT_POINTS, PerfTable
from sdfleet.simulate.pricing import DEFAULT_PRICES
from sdfleet.simulate.report import summary
from sdfleet.simulate.sweep import Objective
from sdfleet.simulate.trace import Arrivals, Generator, TaskClass

SD15 = TaskClass("sd15", 512, 512, 30, "acme", "standard")


def fleet(latency: float | None = None, **scaling: int) -> FleetConfig:
    queue: dict[str, Any] = {"name": "q", "scaling": {"min": 0, "max": 4, "target_backlog": 5, **scaling}}
    runtimes = {}
    if latency is not None:
        queue["runtime"] = "synthetic"
        runtimes = {"synthetic": {"latency_s": latency}}
    return FleetConfig.model_validate({"queues": [queue], "runtimes": runtimes})


def at(times: list[float], cls: TaskClass = SD15) -> Arrivals:
    n = len(times)
    return Arrivals([cls], np.asarray(times, float), np.zeros(n, np.int32), np.ones(n, np.int64))


def run(f: FleetConfig, arrivals: Arrivals, dt: float = 0.0, **params: Any) -> tuple[Result, dict[str, Any]]:
    p = SimParams.model_validate({"drain_after_s": 7200, **params})
    result = simulate(f, arrivals, p, perf=PerfTable(DEFAULT_POINTS), price=DEFAULT_PRICES["h200"], dt=dt)
    return result, summary(result)


NO_NODES = {"enabled": False, "pod_start_s": 0}


def test_one_replica_by_hand() -> None:
    agent = {"receive_s": 0.01, "prepare_s": 0.02, "finish_s": 0.1, "prefetch": 1, "model_load_s": 0}
    agent |= {"receive_max": 1, "finish_concurrency": 0}  # the serial agent, by hand

    _result, s = run(fleet(1.0, min=1, max=1), at([0, 0, 0]), agent=agent, nodes=NO_NODES)
    q = s["queues"]["q"]
    # 1: received 0.01, prepared 0.03, runs to 1.03, finished 1.13. 2: received when the runner
    # took 1 (0.03 + 0.01), runs 1.13 → 2.13, finished 2.23. 3: received when it took 2 (1.14),
    # runs 2.23 → 3.23. Queue wait ends when the run starts: 0.03, 1.13, 2.23.
    assert q["queue_wait_s"]["max"] == pytest.approx(2.23)
    assert q["queue_wait_s"]["p50"] == pytest.approx(1.13, rel=0.012)
    assert q["e2e_s"]["max"] == pytest.approx(3.33)
    assert q["e2e_s"]["mean"] == pytest.approx((1.13 + 2.23 + 3.33) / 3)
    assert q["completed"] == 3 and q["left"] == 0 and q["gpu_busy_s"] == pytest.approx(3.3)
    rep = q["replicas"]
    assert (rep["peak"], rep["cold_starts"], rep["cold_start_s"]["max"]) == (1, 1, 0.0)
    assert rep["mean"] == pytest.approx(1.0)
    # a measured per-replica finishing time replaces finish_s for that replica (calibration)
    _, s = run(
        fleet(1.0, min=1, max=1), at([0, 0, 0]), agent={**agent, "finish_s_samples": [0.5]}, nodes=NO_NODES
    )
    assert s["queues"]["q"]["e2e_s"]["max"] == pytest.approx(0.03 + 3 * 1.5)


def test_scales_from_zero_to_its_maximum_and_back_to_zero() -> None:
    burst = Generator.model_validate(
        {"duration_s": 60, "rate": 0, "bursts": [{"at_s": 0, "duration_s": 10, "rate": 20}]}
    )
    result, s = run(
        fleet(0.5),
        burst.draw({}, 0),
        nodes={**NO_NODES, "pod_start_s": 3},
        keda={"hpa_sync_s": 1, "cooldown_s": 20},
    )
    q = s["queues"]["q"]
    assert q["completed"] == q["arrived"] > 150 and q["replicas"]["peak"] == 4
    assert result.queues["q"].scaler.replicas == 0  # the run ends once the fleet is back at its minimum
    assert q["replicas"]["cold_start_s"]["max"] == pytest.approx(3.0)
    assert s["nodes"]["gpu_hours"]["on_demand"] > 0 and s["nodes"]["gpu_hours"]["spot"] == 0


SPOT = {
    "launch_s": 10,
    "image_pull_s": 0,
    "pod_start_s": 1,
    "consolidate_after_s": 5,
    "interruptions_per_node_hour": 120,
}


def steady(rate: float, duration: float, cls: TaskClass = SD15) -> Arrivals:
    return Generator.model_validate({"duration_s": duration, "rate": rate, "seed": 2}).draw({}, 0)


def test_spot_interruption_drains_short_tasks_without_cutting_any() -> None:
    _, s = run(fleet(1.0, min=2, max=2), steady(1.5, 600), nodes=SPOT)
    q, n = s["queues"]["q"], s["nodes"]
    assert n["interruptions"] >= 3
    assert n["launched"]["spot"] >= 2 + n["interruptions"]  # each interruption got a replacement node
    assert q["interrupted"] == 0 and q["lost_with_node"] == 0  # 1 s tasks finish within the drain
    assert q["completed"] == q["arrived"] and q["replicas"]["cold_starts"] >= 2 + n["interruptions"]


LONG = {**SPOT, "interruptions_per_node_hour": 6}


def test_long_tasks_are_released_after_the_drain_and_retried() -> None:
    # each drain also releases what an agent held ahead, and every receive counts toward
    # max_receives (see the next test)
    agent = {"drain_s": 30}
    _, s = run(fleet(50.0, min=2, max=2), steady(0.03, 1200), nodes=LONG, agent=agent)

    q = s["queues"]["q"]
    assert s["nodes"]["interruptions"] >= 1
    assert q["interrupted"] >= 1 and q["retried"] >= q["interrupted"]
    assert q["completed"] == q["arrived"] and q["dead_lettered"] == 0


def test_prefetched_long_tasks_burn_receives_on_every_drain_without_the_horizon() -> None:
    """A busy agent's receiver keeps its place in the queue's line (Redis and SQS answer the
    longest-waiting poll first), so it prefetches while a 50 s task runs; each spot drain hands
    those back with one more receive counted, and some reach max_receives: dead letters. The
    shipped agent holds only what it starts within ``prefetch_horizon_s`` (30 s: one 50 s task),
    and makes none."""
    runs = {
        h: run(
            fleet(50.0, min=2, max=2),
            steady(0.03, 1200),
            nodes=LONG,
            agent={"drain_s": 30, "prefetch": 4, "prefetch_horizon_s": h},
        )[1]["queues"]["q"]
        for h in (0, 30)
    }
    deep, bounded = runs[0], runs[30]
    assert deep["dead_lettered"] >= 1 and bounded["dead_lettered"] == 0
    assert deep["retried"] > bounded["retried"]
    assert bounded["completed"] == bounded["arrived"]


def test_a_node_gone_before_its_agent_drained_loses_its_tasks_for_a_lease() -> None:
    nodes = {**LONG, "notice_s": 5}  # the instance goes before the 30 s drain is over

    result, s = run(fleet(50.0, min=2, max=2), steady(0.03, 1200), nodes=nodes, agent={"prefetch": 1})
    q = s["queues"]["q"]
    assert q["lost_with_node"] >= 1 and q["retried"] >= 1
    assert q["completed"] == q["arrived"]
    assert q["e2e_s"]["max"] >= result.fleet.retry.lease_s + 50  # came back only when its lease ran out


def test_on_demand_fallback_when_spot_is_short() -> None:
    nodes = {**SPOT, "interruptions_per_node_hour": 0, "spot_max_nodes": 1}
    _, s = run(fleet(1.0, min=3, max=3), steady(1, 100), nodes=nodes)
    n = s["nodes"]
    assert (n["launched"]["spot"], n["launched"]["on_demand"]) == (1, 2) and n["spot_fallbacks"] == 2
    no_fallback = {**nodes, "on_demand_fallback": False}
    _, s = run(fleet(1.0, min=3, max=3), steady(1, 100), nodes=no_fallback, drain_after_s=600)
    assert (s["nodes"]["launched"]["spot"], s["nodes"]["launched"]["on_demand"]) == (1, 0)
    assert (
        s["queues"]["q"]["replicas"]["peak"] == 3
        and s["queues"]["q"]["completed"] == s["queues"]["q"]["arrived"]
    )


def test_a_spot_shortage_window() -> None:
    nodes = {
        **SPOT,
        "interruptions_per_node_hour": 0,
        "shortages": [{"start_s": 0, "end_s": 1e6, "max_nodes": 0}],
    }
    _, s = run(fleet(1.0, min=2, max=2), steady(1, 100), nodes=nodes)
    assert s["nodes"]["launched"] == {"spot": 0, "on_demand": 2}


def test_empty_nodes_are_consolidated_and_billed_to_the_second() -> None:
    nodes = {**SPOT, "interruptions_per_node_hour": 0, "consolidate_after_s": 30}
    result, s = run(fleet(1.0, min=0, max=1), at([0.0]), nodes=nodes, keda={"cooldown_s": 0})
    node = result.cluster.nodes[0]
    assert node.gone_at is not None and result.cluster.live() == []
    hours = (node.gone_at - node.launched_at) / 3600
    assert s["nodes"]["gpu_hours"]["spot"] == pytest.approx(hours)
    assert s["nodes"]["cost_usd"]["total"] == pytest.approx(hours * DEFAULT_PRICES["h200"].spot_price)


def test_model_aware_order_switches_far_less_than_fifo() -> None:
    classes = [TaskClass(f"m{i}", 512, 512, 30, "acme", "standard") for i in range(4)]
    rng = np.random.default_rng(5)
    arrivals = Arrivals(
        classes,
        np.sort(rng.uniform(0, 100, 600)),
        rng.integers(0, 4, 600).astype(np.int32),
        np.ones(600, np.int64),
    )
    agent = {"prefetch": 16, "receive_max": 10, "cache_size": 1, "model_load_s": 2.0}
    common = {"nodes": NO_NODES, "keda": {"min_replicas": 2, "max_replicas": 2}}
    _, fifo = run(fleet(), arrivals, agent=agent, **common)
    _, aware = run(fleet(), arrivals, agent={**agent, "model_aware": True, "pass_over_s": 60}, **common)
    assert aware["queues"]["q"]["switches"] <= fifo["queues"]["q"]["switches"] / 5
    assert aware["queues"]["q"]["e2e_s"]["p95"] < fifo["queues"]["q"]["e2e_s"]["p95"]
    _, unbound = run(fleet(), arrivals, agent={**agent, "model_aware": True, "pass_over_s": 0}, **common)
    assert unbound["queues"]["q"]["switches"] == fifo["queues"]["q"]["switches"]  # a bound of 0 is FIFO


def test_dynamic_batching_drains_a_backlog_faster() -> None:
    backlog = at([0.0] * 200)
    common = {"nodes": NO_NODES, "keda": {"min_replicas": 1, "max_replicas": 1}}
    _, one = run(fleet(), backlog, agent={"prefetch": 8}, **common)
    _, four = run(fleet(), backlog, agent={"prefetch": 8, "max_batch": 4, "finish_concurrency": 4}, **common)
    assert (
        four["queues"]["q"]["e2e_s"]["max"] < one["queues"]["q"]["e2e_s"]["max"] / 2.5
    )  # 0.93 vs 4 × 0.78 s


def test_aggregate_mode_agrees_with_exact_mode() -> None:
    arrivals = steady(4.0, 1800)
    common = {"nodes": NO_NODES, "keda": {"min_replicas": 1, "max_replicas": 8, "hpa_sync_s": 15}}
    _, exact = run(fleet(), arrivals, dt=0.0, **common)
    _, agg = run(fleet(), arrivals.binned(1.0), dt=1.0, **common)
    e, a = exact["queues"]["q"], agg["queues"]["q"]
    assert a["completed"] == e["completed"] == arrivals.total
    for key in ("p50", "p95"):
        assert a["e2e_s"][key] == pytest.approx(e["e2e_s"][key], rel=0.15), key
    assert a["replicas"]["mean"] == pytest.approx(e["replicas"]["mean"], rel=0.15)
    assert a["gpu_busy_s"] == pytest.approx(e["gpu_busy_s"], rel=0.05)


def test_overlapping_filters_route_to_the_first_queue_and_unrouted_requests_are_reported() -> None:
    # As the API's subscriptions do (effective policies): a request reaches one queue, never a copy each.
    f = FleetConfig.model_validate(
        {
            "queues": [
                {"name": "sd15", "filter": {"sd_model_checkpoint": ["sd15"]}},
                {"name": "paid", "filter": {"tenant_tier": ["paid"]}},
            ]
        }
    )
    classes = [
        SD15,
        TaskClass("sd15", 512, 512, 30, "bob", "paid"),
        TaskClass("xl", 1024, 1024, 30, "c", "standard"),
    ]
    arrivals = Arrivals(
        classes, np.array([0.0, 1.0, 2.0]), np.array([0, 1, 2], np.int32), np.ones(3, np.int64)
    )
    r, s = run(f, arrivals, nodes=NO_NODES)
    assert s["refused_no_route"] == 1 and r.routes.queues == [["sd15"], ["sd15"], []]
    assert s["queues"]["sd15"]["arrived"] == 2 and s["queues"]["paid"]["arrived"] == 0


def test_a_queues_ttl_expires_what_waits_too_long_and_costs_no_gpu_time() -> None:
    """``queues[].ttl_s``: one replica at 1 s a request gets through about ttl_s of a burst of 100;
    the rest expire (on receipt, or waiting in the agent), each mode alike, and take no GPU time.
    A sweep does not call such a fleet good enough."""
    f = FleetConfig.model_validate(
        {
            "queues": [{"name": "q", "runtime": "synthetic", "ttl_s": 10}],
            "runtimes": {"synthetic": {"latency_s": 1.0}},
        }
    )
    burst = at([0.0] * 100)
    common = {"nodes": NO_NODES, "keda": {"min_replicas": 1, "max_replicas": 1}}
    for dt, arrivals in ((0.0, burst), (1.0, burst.binned(1.0))):
        _, s = run(f, arrivals, dt=dt, agent={"finish_concurrency": 4, "model_load_s": 0}, **common)
        q = s["queues"]["q"]
        assert 9 <= q["completed"] <= 12, (dt, q["completed"])
        assert q["completed"] + q["expired"] == 100 and q["left"] == 0, (dt, q)
        assert q["queue_wait_s"]["max"] <= 10.5, (dt, q["queue_wait_s"])
        assert q["gpu_busy_s"] == pytest.approx(q["completed"] * 1.0, rel=0.15), (dt, q)
        assert not Objective.parse("e2e_p95<=3600").met(s)  # an expired request is not served
    _, unlimited = run(fleet(1.0, min=1, max=1), burst, agent={"finish_concurrency": 4}, nodes=NO_NODES)
    assert unlimited["queues"]["q"]["completed"] == 100 and unlimited["queues"]["q"]["expired"] == 0
