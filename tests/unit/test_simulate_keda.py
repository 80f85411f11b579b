"""KEDA's and the HPA's scaling rule against their documented formulas.

KEDA: https://keda.sh/docs/2.17/concepts/scaling-deployments/ (activation phase, scaling phase) and
the ScaledObject spec (pollingInterval, cooldownPeriod, min/max). HPA:
https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/ (algorithm details,
tolerance 0.1, stabilisation window, scaling policies, default behaviour).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from sdfleet.simulate.keda import Autoscaler, hpa_desired
from sdfleet.simulate.params import KedaParams, NodeParams, Policy, Rules
from sdfleet.simulate.report import chart_karpenter, chart_scaling

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "sdfleet" / "values.yaml"


def params(**kw: object) -> KedaParams:
    return KedaParams.model_validate(kw)


def up(*policies: Policy, window: float = 0, select: str = "Max") -> Rules:
    return Rules.model_validate({"stabilization_s": window, "policies": list(policies), "select": select})


def pods(n: int, period: float = 15) -> Policy:
    return Policy(type="Pods", value=n, period_s=period)


def percent(n: int, period: float = 15) -> Policy:
    return Policy(type="Percent", value=n, period_s=period)


@pytest.mark.parametrize(
    ("metric", "current", "target", "expected"),
    [
        (30, 1, 10, 3),  # KEDA aws-sqs-queue docs: 30 messages, queueLength 10 → 3 pods
        (31, 2, 10, 4),  # ceil
        (50 * 90, 50, 75, 60),  # HPA docs: 50 replicas at 90 for a target of 75 → 60
        (10.5 * 4, 4, 10, 4),  # ratio 1.05: within the 0.1 tolerance, no change
        (11.5 * 4, 4, 10, 5),  # ratio 1.15: outside it
        (9.2 * 5, 5, 10, 5),  # ratio 0.92: within
        (0, 3, 10, 0),  # nothing left: 0 (the HPA's minimum of 1 applies later)
    ],
)
def test_hpa_formula_is_ceil_of_metric_over_target_with_tolerance(
    metric: float, current: int, target: float, expected: int
) -> None:
    assert hpa_desired(metric, current, target) == expected
    if abs(metric / (target * current) - 1) > 0.1:
        assert expected == math.ceil(current * (metric / current) / target)


def test_activation_only_above_the_activation_value() -> None:
    a = Autoscaler(params(activation=5), min_replicas=0, max_replicas=10, target=10)
    assert a.replicas == 0  # created at minReplicaCount
    assert a.poll(0, 5) == 0  # "greater than, not greater than or equal to"
    assert a.poll(1, 6) == 1  # scale from zero goes to one, the HPA takes it from there
    b = Autoscaler(params(), min_replicas=0, max_replicas=10, target=10)
    assert b.poll(0, 0) == 0 and b.poll(1, 1) == 1  # activation 0: one message activates


def test_activation_value_wins_over_the_target() -> None:
    # docs: threshold 10, activationThreshold 50, 40 messages → not active → scaled to zero
    a = Autoscaler(params(activation=50, cooldown_s=0), min_replicas=0, max_replicas=10, target=10)
    a.replicas, a.last_active = 4, 0.0
    assert a.poll(1, 40) == 0


def test_cooldown_counts_from_the_last_active_poll() -> None:
    a = Autoscaler(params(cooldown_s=60), min_replicas=0, max_replicas=10, target=10)
    a.poll(0, 3)
    a.poll(10, 2)  # still active: last active at 10
    assert a.poll(30, 0) == 1
    assert a.poll(69, 0) == 1
    assert a.poll(70, 0) == 0  # 60 s after the last active poll


def test_minimum_of_one_is_always_active_and_never_reaches_zero() -> None:
    a = Autoscaler(params(activation=100, cooldown_s=0), min_replicas=2, max_replicas=10, target=10)
    assert a.replicas == 2
    assert a.poll(0, 0) == 2 and a.sync(15, 0) == 2


def test_hpa_does_nothing_at_zero_replicas() -> None:
    a = Autoscaler(params(), min_replicas=0, max_replicas=10, target=10)
    assert a.sync(0, 500) == 0  # 0 → 1 is KEDA's


def test_default_scale_up_policies_four_pods_or_double_per_15_s() -> None:
    rules = up(percent(100), pods(4))  # Kubernetes' default scaleUp
    a = Autoscaler(params(scale_up=rules), min_replicas=1, max_replicas=100, target=1)
    assert a.sync(0, 1000) == 5  # from 1: max(1 + 4, 2 × 1)
    assert a.sync(5, 1000) == 5  # the period started at 1 replica: its limit is reached
    assert a.sync(16, 1000) == 10  # a new period: max(5 + 4, 2 × 5)
    assert a.sync(31, 1000) == 20
    assert a.sync(46, 1000) == 40


def test_select_min_takes_the_smallest_change() -> None:
    rules = up(percent(100), pods(4), select="Min")
    a = Autoscaler(params(scale_up=rules), min_replicas=1, max_replicas=100, target=1)
    a.replicas = 10
    assert a.sync(0, 1000) == 14  # min(10 + 4, 20)


def test_scale_down_stabilisation_keeps_the_highest_recent_recommendation() -> None:
    down = up(percent(100), window=120)
    a = Autoscaler(params(scale_down=down, tolerance=0), min_replicas=1, max_replicas=100, target=10)
    a.replicas = 8
    assert a.sync(0, 80) == 8
    assert a.sync(15, 20) == 8  # wants 2, but 8 was recommended within 120 s
    assert a.sync(60, 30) == 8
    assert a.sync(121, 30) == 3  # the 8 of t=0 left the window; 3 (t=60) is the highest now
    assert a.sync(200, 0) == 3  # 3 was recommended at 121
    assert a.sync(242, 0) == 1  # the HPA's minimum is max(1, minReplicaCount)


def test_scale_down_policy_limits_the_rate() -> None:
    down = up(pods(1, period=60), window=0)
    a = Autoscaler(params(scale_down=down), min_replicas=1, max_replicas=100, target=10)
    a.replicas = 10
    assert a.sync(0, 0) == 9
    assert a.sync(30, 0) == 9  # one pod per 60 s
    assert a.sync(61, 0) == 8


def test_percent_scale_down_truncates_and_disabled_never_scales() -> None:
    a = Autoscaler(params(scale_down=up(percent(15, 60))), min_replicas=1, max_replicas=100, target=10)
    a.replicas = 10
    assert a.sync(0, 0) == 8  # int(10 × 0.85) = 8
    b = Autoscaler(
        params(scale_down=up(pods(4), select="Disabled")), min_replicas=1, max_replicas=9, target=10
    )
    b.replicas = 6
    assert b.sync(0, 0) == 6


def test_scale_up_stabilisation_keeps_the_lowest_recent_recommendation() -> None:
    rules = up(pods(100), window=30)
    a = Autoscaler(params(scale_up=rules), min_replicas=1, max_replicas=100, target=10)
    assert a.sync(0, 10) == 1
    assert a.sync(10, 100) == 1  # the 1 of t=0 is within 30 s
    assert a.sync(31, 100) == 10


def test_maximum_caps_and_policy_defaults_fill_an_empty_behaviour() -> None:
    a = Autoscaler(params(scale_up=up()), min_replicas=1, max_replicas=3, target=1)
    assert a.sync(0, 1000) == 3  # no policy given → Kubernetes' defaults; max 3


def test_simulation_defaults_are_the_charts() -> None:
    chart = yaml.safe_load(CHART.read_text())
    scaling = chart["workerDefaults"]["scaling"]
    ours = chart_scaling(
        KedaParams(),
        minimum=scaling["minReplicaCount"],
        maximum=scaling["maxReplicaCount"],
        target=scaling["targetBacklog"],
    )
    assert ours == {k: scaling[k] for k in ours}
    karpenter = chart_karpenter(NodeParams())["gpuClasses"]["gpu"]
    assert karpenter.items() <= chart["karpenter"]["gpuClasses"]["gpu"].items()
