"""The chart's PrometheusRule, checked for what it does: its rules are run by Prometheus's own
``promtool test rules`` over series shaped as the ServiceMonitor scrapes them (two API replicas
reporting the same queue gauges, another release's namespace beside), and must fire, stay quiet
and resolve when an operator would expect. Also validated against the pinned CRD."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_checks import crd_validators, merge, of_kind, render, value_sets

from sdfleet.telemetry import Metrics

SETS = value_sets()
ON = {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool comes with Debian's prometheus (make system-deps)"
)


def rule(values: dict[str, Any]) -> dict[str, Any]:
    (obj,) = of_kind(render(values), "PrometheusRule")
    return obj


def promtool_test(tmp_path: Path, spec: dict[str, Any], tests: list[dict[str, Any]]) -> None:
    """``promtool test rules`` of ``spec``'s groups; fails with promtool's own report."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": spec["groups"]}))
    check = subprocess.run(
        [PROMTOOL, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    suite = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(suite))
    run = subprocess.run(
        [PROMTOOL, "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def api_series(metric: str, queue: str, values: str, namespace: str = "sd") -> list[dict[str, str]]:
    """``metric`` as two API replicas report it (same figures), as a ServiceMonitor labels it."""
    return [
        {
            "series": f'{metric}{{namespace="{namespace}",pod="fleet-sdfleet-api-{n}",queue="{queue}"}}',
            "values": values,
        }
        for n in (0, 1)
    ]


def test_no_rule_by_default_and_a_valid_one_when_asked() -> None:
    assert not of_kind(render(SETS["aws-diffusers"]), "PrometheusRule")
    obj = rule(
        merge(SETS["redis"], merge(ON, {"metrics": {"prometheusRule": {"labels": {"release": "kp"}}}}))
    )
    validator = crd_validators()[(obj["apiVersion"], obj["kind"])]
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
    assert not errors, errors
    assert obj["metadata"]["labels"]["release"] == "kp"
    names = {family.name for family in Metrics().registry.collect()}
    for r in obj["spec"]["groups"][0]["rules"]:
        metric = r["expr"].split("(")[2].split("{")[0]
        assert metric in names, f"{r['alert']} reads {metric}, which sdfleet does not export"


@needs_promtool
def test_dead_letters_alert_after_its_wait_once_per_queue_and_resolve_after_a_redrive(tmp_path: Path) -> None:
    spec = rule(merge(SETS["aws-diffusers"], ON))["spec"]
    series = [
        # sd15: 0, then 2 dead letters from minute 2 to 12, then redriven (0)
        *api_series("sdfleet_queue_dead_letters", "sd15", "0 0 2x10 0x5"),
        *api_series("sdfleet_queue_dead_letters", "dynamic", "0x18"),
        *api_series("sdfleet_queue_dead_letters", "sd15", "7x18", namespace="other-release"),
    ]
    fired = {
        "exp_labels": {"severity": "warning", "namespace": "sd", "queue": "sd15"},
        "exp_annotations": {
            "summary": "2 dead letters on queue sd15 (sd)",
            "description": "Tasks of queue sd15 failed on every try (or their agents died on each) and "
            'wait in its dead-letter queue. See them with "sdfleet dlq list sd15", run them again with '
            '"sdfleet dlq redrive sd15" once the cause is fixed.',
        },
    }
    checks = [
        {"eval_time": "6m", "alertname": "SdfleetDeadLetters", "exp_alerts": []},  # pending: 4 of 5 minutes
        {"eval_time": "8m", "alertname": "SdfleetDeadLetters", "exp_alerts": [fired]},
        {"eval_time": "16m", "alertname": "SdfleetDeadLetters", "exp_alerts": []},  # redriven
    ]
    promtool_test(tmp_path, spec, [{"interval": "1m", "input_series": series, "alert_rule_test": checks}])


@needs_promtool
def test_a_task_waiting_past_the_bound_alerts_and_a_cold_start_does_not(tmp_path: Path) -> None:
    values = merge(
        SETS["redis"],
        merge(ON, {"metrics": {"prometheusRule": {"oldestAgeSeconds": 600, "severity": "page"}}}),
    )
    spec = rule(values)["spec"]
    series = [
        # sd15: a cold start (its oldest task waits 4 minutes, then is taken), later one stuck 20 minutes
        *api_series("sdfleet_queue_oldest_age_seconds", "sd15", "0 60 120 180 240 0 0 0+60x20"),
        *api_series("sdfleet_queue_oldest_age_seconds", "dynamic", "0x28"),
    ]
    fired = {
        "exp_labels": {"severity": "page", "namespace": "sd", "queue": "sd15"},
        "exp_annotations": {
            "summary": "The oldest task of queue sd15 (sd) has waited 18m 0s",
            "description": "No worker has taken it: check the queue's workers (KEDA ScaledObject, pending "
            'pods, GPU capacity, image pulls) with "sdfleet queues" and kubectl.',
        },
    }
    checks = [
        {"eval_time": "5m", "alertname": "SdfleetQueueWaiting", "exp_alerts": []},
        {"eval_time": "20m", "alertname": "SdfleetQueueWaiting", "exp_alerts": []},  # 780 s: pending
        {"eval_time": "25m", "alertname": "SdfleetQueueWaiting", "exp_alerts": [fired]},
    ]
    promtool_test(tmp_path, spec, [{"interval": "1m", "input_series": series, "alert_rule_test": checks}])


def test_the_waiting_alert_can_be_left_out() -> None:
    spec = rule(merge(SETS["redis"], merge(ON, {"metrics": {"prometheusRule": {"oldestAgeSeconds": 0}}})))[
        "spec"
    ]
    assert [r["alert"] for r in spec["groups"][0]["rules"]] == ["SdfleetDeadLetters"]
