"""Scraping and dashboards: the chart's ServiceMonitor/PodMonitor (validated against the pinned
prometheus-operator CRDs) and the agents' metrics port; the Grafana dashboard asks only for metrics
and labels that ``Metrics()`` registers."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from k8s_checks import CHART, ROOT, crd_validators, merge, of_kind, pod_spec, render, value_sets, workers
from prometheus_client.metrics import MetricWrapperBase

from sdfleet.telemetry import Metrics

SETS = value_sets()
DASHBOARD = ROOT / "deploy" / "grafana" / "sdfleet-dashboard.json"
PORT = 9400
ON = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}}}}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def _agent(spec: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in spec["containers"] if c["name"] == "agent")


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("name", sorted(SETS))
def test_monitors_validate_and_select_the_api_and_the_agents(name: str) -> None:
    values = merge(SETS[name], {**ON, "agent": {"metricsPort": PORT}})
    objs = render(values)
    (sm,) = of_kind(objs, "ServiceMonitor")
    (pm,) = of_kind(objs, "PodMonitor")
    validators = crd_validators()
    for mon in (sm, pm):
        errors = [
            f"{list(e.absolute_path)}: {e.message}"
            for e in validators[(mon["apiVersion"], mon["kind"])].iter_errors(mon)
        ]
        assert not errors, (mon["kind"], errors)
        assert mon["metadata"]["labels"]["release"] == "kube-prometheus"
        assert mon["spec"]["namespaceSelector"] == {"matchNames": ["sd"]}
    (api_svc,) = [  # only the ops Service: /metrics is not on the public port (nor the Ingress)
        s
        for s in of_kind(objs, "Service")
        if _matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert api_svc["metadata"]["name"] == "fleet-sdfleet-api-ops"
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in api_svc["spec"]["ports"]}
    (pod_endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert workers(objs)
    for w in workers(objs):
        template = (
            w["spec"]["jobTargetRef"]["template"] if w["kind"] == "ScaledJob" else w["spec"]["template"]
        )
        assert _matches(pm["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
        agent = _agent(pod_spec(w))
        assert {"name": "metrics", "containerPort": PORT, "protocol": "TCP"} in agent["ports"]
        assert pod_endpoint["port"] == "metrics"
        env = _env(agent)
        assert env["SDFLEET_AGENT__METRICS_PORT"] == str(PORT)
        assert env["SDFLEET_AGENT__METRICS_HOST"] == "0.0.0.0"
        if w["kind"] == "Deployment":
            kubernetes_validate.validate(w, "1.33.0", strict=True)
    report = helm.lint(CHART, values, strict=True, kube_version="v1.33.0")
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report


def test_no_monitors_and_no_metrics_port_by_default() -> None:
    objs = render(SETS["aws-diffusers"])
    assert not of_kind(objs, "ServiceMonitor") and not of_kind(objs, "PodMonitor")
    for w in workers(objs):
        agent = _agent(pod_spec(w))
        assert "ports" not in agent and "SDFLEET_AGENT__METRICS_PORT" not in _env(agent)


def test_without_agent_port_only_the_api_is_scraped() -> None:
    objs = render(merge(SETS["redis"], ON))
    assert len(of_kind(objs, "ServiceMonitor")) == 1 and not of_kind(objs, "PodMonitor")


@pytest.mark.parametrize(
    "bad",
    [
        {"metrics": {"serviceMonitor": {"enabled": True, "interval": "soon"}}},
        {"metrics": {"serviceMonitor": {"enabled": True, "scrapeInterval": "30s"}}},
        {"agent": {"metricsPort": 70000}},
    ],
)
def test_schema_refuses_bad_monitoring_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(merge(SETS["redis"], bad))


# --- the Grafana dashboard -----------------------------------------------------------------------


def registered() -> dict[str, tuple[str, set[str]]]:
    """Sample name (as Prometheus stores it) → (metric family, label names), from ``Metrics()``."""
    m = Metrics()
    labels = {
        w._name: set(w._labelnames)  # the registry does not expose label names of childless metrics
        for w in vars(m).values()
        if isinstance(w, MetricWrapperBase)
    }
    out: dict[str, tuple[str, set[str]]] = {}
    for family in m.registry.collect():
        for suffix in SUFFIXES.get(family.type, ("",)):
            extra = {"le"} if suffix == "_bucket" else set()
            out[family.name + suffix] = (family.name, labels[family.name] | extra)
    return out


TARGET_LABELS = {"namespace", "pod"}
"""Labels Prometheus puts on every scraped series of a pod (PodMonitor, ServiceMonitor)."""
DCGM_LABELS = {"gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION"}
DCGM_LABELS |= {"namespace", "pod", "container"}  # the pod a GPU is allocated to (its pod mapping)


def dcgm_fields() -> dict[str, tuple[str, set[str]]]:
    """The DCGM exporter's series the chart's DaemonSet collects (``dcgmExporter.counters``)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    out = {}
    for line in values["dcgmExporter"]["counters"]:
        field, kind, _ = (x.strip() for x in line.split(",", 2))
        if kind != "label":
            out[field] = (field, DCGM_LABELS)
    return out


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_is_grafana_json_with_a_datasource_and_queue_variable() -> None:
    dash = _dashboard()
    assert dash["schemaVersion"] >= 39 and dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["queue"]["definition"] == "label_values(sdfleet_queue_visible, queue)"
    assert variables["queue"]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}" and p["targets"], p["title"]
            assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in p["targets"])


def _check_expr(expr: str, known: dict[str, tuple[str, set[str]]]) -> set[str]:
    """The metric families ``expr`` reads; fails on unknown metrics or labels, or unbalanced brackets."""
    for open_, close in ("()", "{}", "[]"):
        assert expr.count(open_) == expr.count(close), expr
    names = set(re.findall(r"\b(?:sdfleet|DCGM_FI)_[A-Za-z0-9_]+\b", expr))
    assert names, expr
    assert names <= set(known), (expr, names - set(known))
    labels = set().union(*(known[n][1] for n in names))
    for name, matchers in re.findall(r"\b((?:sdfleet|DCGM_FI)_[A-Za-z0-9_]+)\{([^}]*)\}", expr):
        used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
        assert used <= known[name][1], (expr, name, used - known[name][1])
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        used = {g.strip() for g in grouping.split(",") if g.strip()}
        assert used <= labels, (expr, used - labels)
    for matching in re.findall(r"\b(?:on|ignoring)\s*\(([^)]*)\)", expr):
        used = {g.strip() for g in matching.split(",") if g.strip()}
        assert used <= labels | TARGET_LABELS, (expr, used - labels - TARGET_LABELS)
    assert 'queue=~"$queue"' in expr, f"panel ignores the queue variable: {expr}"
    return {known[n][0] for n in names}


def test_dashboard_queries_use_only_registered_metrics_and_labels() -> None:
    ours = registered()
    known = {**ours, **dcgm_fields()}
    assert {"sdfleet_tasks_total", "sdfleet_stage_seconds_bucket", "sdfleet_queue_visible"} <= set(known)
    families = set().union(*(_check_expr(e, known) for e in _exprs(_dashboard())))
    assert {f for f in families if f.startswith("sdfleet_")} == {f for f, _ in ours.values()}, (
        "every metric has a panel"
    )
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"} <= families, "GPU panels"


def test_in_range_stats_are_instant_increases() -> None:
    # one value over the whole range; the series start at 0 (Metrics.start_api/start_agent), so
    # increase() has a sample before the first task and counts it
    stats = [p for p in _dashboard()["panels"] if p["title"].endswith("in range")]
    assert len(stats) >= 3
    for p in stats:
        (t,) = p["targets"]
        assert t["instant"] is True and t["range"] is False, p["title"]
        assert "increase(" in t["expr"] and "[$__range]" in t["expr"], p["title"]


def test_dashboard_check_refuses_unknown_metrics_and_labels() -> None:
    known = registered()
    for bad in (
        'sum(rate(sdfleet_task_total{queue=~"$queue"}[5m]))',
        'sum by (model) (rate(sdfleet_tasks_total{queue=~"$queue"}[5m]))',
        'sdfleet_queue_visible{queue=~"$queue",state="x"}',
        'histogram_quantile(0.5, sum by (le) (rate(sdfleet_stage_seconds{queue=~"$queue"}[5m]))',
        "sdfleet_queue_visible",
        'sdfleet_agent_info{queue=~"$queue"} * on (node) group_left () DCGM_FI_DEV_GPU_UTIL',
        'avg by (queue) (DCGM_FI_DEV_GPU_UTILIZATION) + sdfleet_runtime_busy{queue=~"$queue"}',
    ):
        with pytest.raises(AssertionError):
            _check_expr(bad, {**known, **dcgm_fields()})


def test_stage_quantiles_cover_p50_and_p95_per_stage() -> None:
    exprs = _exprs(_dashboard())
    for q in ("0.5", "0.95"):
        assert any(
            e.startswith(f"histogram_quantile({q}, sum by (stage, le)")
            and "sdfleet_stage_seconds_bucket" in e
            for e in exprs
        ), q


def test_docs_name_every_metric_setting_and_the_dashboard() -> None:
    doc = (ROOT / "docs" / "observability.md").read_text()
    assert str(DASHBOARD.relative_to(ROOT)) in doc
    for family, _ in registered().values():
        assert f"`{family}" in doc, family
    for setting in ("SDFLEET_API__QUEUE_STATS_S", "SDFLEET_AGENT__METRICS_PORT", "SDFLEET_OTLP_ENDPOINT"):
        assert setting in doc, setting
