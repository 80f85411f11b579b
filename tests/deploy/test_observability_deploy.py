"""The chart's optional ADOT collector and DCGM exporter, and the CDK role of the collector, checked
for what they do: the collector's config parses, is complete, routes spans from OTLP to the awsxray
exporter and scrapes exactly this release's API and agent ports into awsemf; the DCGM DaemonSet
lands on the GPU nodes the chart's NodePools make (and tolerates their taint) and nowhere else; the
CDK role trusts the collector's service account and may call what its exporters call."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from k8s_checks import (
    NAMESPACE,
    REGION,
    RELEASE,
    ROOT,
    crd_validators,
    merge,
    of_kind,
    render,
    tolerates,
    value_sets,
)

SETS = value_sets()
ROLE_ARN = "arn:aws:iam::123456789012:role/sdfleet-adot"
ADOT_ON = {
    "adot": {"enabled": True, "serviceAccount": {"roleArn": ROLE_ARN}},
    "agent": {"metricsPort": 9400},
}
DCGM_ON = {"dcgmExporter": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}}
FULLNAME = f"{RELEASE}-sdfleet"
DASHBOARD = ROOT / "deploy" / "grafana" / "sdfleet-dashboard.json"


def _named(objs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    (obj,) = [o for o in of_kind(objs, kind) if o["metadata"]["name"].endswith(suffix)]
    return obj


def _collector(objs: list[dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(_named(objs, "ConfigMap", "-adot")["data"]["collector.yaml"])
    return config


def _check_complete(config: dict[str, Any]) -> None:
    """What the collector refuses at start (a pipeline naming an undefined component), and no
    component defined but left out of every pipeline."""
    pipelines = config["service"]["pipelines"]
    for section in ("receivers", "processors", "exporters"):
        used = {c for p in pipelines.values() for c in p.get(section, [])}
        assert used == set(config.get(section) or {}), (section, used)
    assert set(config["service"]["extensions"]) == set(config["extensions"])


def _relabel_keep(rules: list[dict[str, Any]], meta: dict[str, str]) -> bool:
    """Prometheus relabelling, ``keep`` rules only (regexes are anchored, as Prometheus does)."""
    for rule in rules:
        if rule.get("action", "replace") != "keep":
            continue
        value = rule.get("separator", ";").join(meta.get(k, "") for k in rule["source_labels"])
        if not re.fullmatch(rule["regex"], value):
            return False
    return True


def _targets(objs: list[dict[str, Any]], release: str = RELEASE) -> list[dict[str, str]]:
    """The pod role's discovery meta labels: one target per container port of each rendered pod."""
    out = []
    for w in of_kind(objs, "Deployment"):
        template = w["spec"]["template"]
        labels = template["metadata"]["labels"]
        for c in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            for port in c.get("ports", []):
                meta = {
                    f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
                    for k, v in labels.items()
                }
                meta["__meta_kubernetes_pod_label_app_kubernetes_io_instance"] = release
                meta["__meta_kubernetes_pod_container_port_name"] = port["name"]
                meta["__meta_kubernetes_pod_container_port_number"] = str(port["containerPort"])
                meta["__meta_kubernetes_pod_container_name"] = c["name"]
                out.append(meta)
    return out


@pytest.mark.parametrize("name", ["aws-diffusers", "a1111-sidecar"])
def test_collector_routes_spans_to_xray_and_scrapes_this_release(name: str) -> None:
    objs = render(merge(SETS[name], ADOT_ON))
    config = _collector(objs)
    _check_complete(config)
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"] and traces["exporters"] == ["awsxray"]
    assert config["exporters"]["awsxray"]["region"] == REGION
    assert "sdfleet.task_id" in config["exporters"]["awsxray"]["indexed_attributes"]
    assert config["service"]["pipelines"]["metrics"]["exporters"] == ["awsemf"]
    emf = config["exporters"]["awsemf"]
    assert (emf["region"], emf["log_group_name"]) == (REGION, f"/aws/sdfleet/{FULLNAME}/metrics")
    # the Service's OTLP/HTTP port reaches the receiver's endpoint in the collector pod
    deployment, service = _named(objs, "Deployment", "-adot"), _named(objs, "Service", "-adot")
    pod = deployment["spec"]["template"]
    assert all(pod["metadata"]["labels"].get(k) == v for k, v in service["spec"]["selector"].items())
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (http,) = [p for p in service["spec"]["ports"] if p["port"] == 4318]
    endpoint = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert ports[http["targetPort"]] == int(endpoint.rsplit(":", 1)[1]) == 4318
    # the API and the agents send their spans to that Service's OTLP/HTTP port
    sent = {
        env["value"]
        for obj in objs
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] != deployment["metadata"]["name"]
        for c in obj["spec"]["template"]["spec"]["containers"]
        for env in c.get("env", [])
        if env["name"] == "SDFLEET_OTLP_ENDPOINT"
    }
    assert sent == {f"http://{service['metadata']['name']}:{http['port']}/v1/traces"}
    (mount,) = container["volumeMounts"]
    assert container["args"] == [f"--config={mount['mountPath']}/collector.yaml"]
    (volume,) = pod["spec"]["volumes"]
    assert volume["configMap"]["name"] == _named(objs, "ConfigMap", "-adot")["metadata"]["name"]
    # identity: the CDK role on the service account; pods discovered through a namespaced Role
    sa = _named(objs, "ServiceAccount", "-adot")
    assert pod["spec"]["serviceAccountName"] == sa["metadata"]["name"] == f"{FULLNAME}-adot"
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == ROLE_ARN
    binding, role = _named(objs, "RoleBinding", "-adot"), _named(objs, "Role", "-adot")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{FULLNAME}-adot", "namespace": NAMESPACE}
    ]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    # scraped: the API's port and each agent's metrics port; not the runtimes, not another release
    (job,) = config["receivers"]["prometheus"]["config"]["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": [NAMESPACE]}}]
    kept = [t for t in _targets(objs) if _relabel_keep(job["relabel_configs"], t)]
    assert {
        (
            t["__meta_kubernetes_pod_label_app_kubernetes_io_component"],
            t["__meta_kubernetes_pod_container_port_name"],
        )
        for t in kept
    } == {("api", "ops"), ("worker", "metrics")}
    # the API's kept port is the one that serves /metrics: with an ops port set, the public one
    # answers 404 there (routes/health.py)
    (api,) = [t for t in kept if t["__meta_kubernetes_pod_label_app_kubernetes_io_component"] == "api"]
    api_env = {
        e["name"]: e.get("value")
        for o in of_kind(objs, "Deployment")
        if o["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "api"
        for c in o["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
    }
    assert api["__meta_kubernetes_pod_container_port_number"] == api_env["SDFLEET_API__OPS_PORT"]
    assert not [t for t in _targets(objs, "other") if _relabel_keep(job["relabel_configs"], t)]
    for obj in (deployment, service, sa, role, binding, _named(objs, "ConfigMap", "-adot")):
        kubernetes_validate.validate(obj, "1.33.0", strict=True)


def test_collector_for_traces_only_and_off_by_default() -> None:
    assert not [o for o in render(SETS["redis"]) if "adot" in o["metadata"]["name"]]
    objs = render(merge(SETS["redis"], {"adot": {"enabled": True, "metrics": {"cloudwatch": False}}}))
    config = _collector(objs)
    _check_complete(config)
    assert set(config["service"]["pipelines"]) == {"traces"}
    adot_roles = [r for r in of_kind(objs, "Role") if "adot" in r["metadata"]["name"]]
    assert not adot_roles and "prometheus" not in config["receivers"]
    off = _collector(render(merge(SETS["redis"], {"adot": {"enabled": True, "traces": {"xray": False}}})))
    _check_complete(off)
    assert off["service"]["pipelines"]["traces"]["exporters"] == ["debug"]


def _node_matches(terms: list[dict[str, Any]], labels: dict[str, str]) -> bool:
    """Kubernetes' nodeSelectorTerms: any term whose matchExpressions all hold."""

    def holds(e: dict[str, Any]) -> bool:
        op, key = e["operator"], e["key"]
        if op == "Exists":
            return key in labels
        if op == "DoesNotExist":
            return key not in labels
        if op == "In":
            return labels.get(key) in e["values"]
        if op == "NotIn":
            return labels.get(key) not in e["values"]
        raise AssertionError(op)

    return any(all(holds(e) for e in t.get("matchExpressions", [])) for t in terms)


def _gpu_nodes(objs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, str], list[dict[str, Any]]]]:
    """(labels, taints) of a node each rendered NodePool launches (its template labels and the
    first value of each In requirement; Karpenter's GPU count label on GPU instances)."""
    for pool in of_kind(objs, "NodePool"):
        spec = pool["spec"]["template"]
        labels = dict(spec["metadata"]["labels"])
        for r in spec["spec"]["requirements"]:
            if r["operator"] == "In":
                labels[r["key"]] = r["values"][0]
        labels["karpenter.k8s.aws/instance-gpu-count"] = "1"
        yield labels, spec["spec"]["taints"]


def test_dcgm_exporter_runs_on_gpu_nodes_only_and_is_scraped_with_pod_labels() -> None:
    objs = render(merge(SETS["aws-diffusers"], DCGM_ON))
    ds = _named(objs, "DaemonSet", "-dcgm-exporter")
    pod = ds["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    nodes = list(_gpu_nodes(objs))
    assert nodes
    for labels, taints in nodes:
        assert _node_matches(terms, labels), labels
        assert all(tolerates(pod["tolerations"], t) for t in taints), taints
    cpu_node = {
        "kubernetes.io/arch": "amd64",
        "karpenter.sh/capacity-type": "on-demand",
        "karpenter.k8s.aws/instance-family": "m7i",
    }
    assert not _node_matches(terms, cpu_node)
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DCGM_EXPORTER_KUBERNETES"] == "true"  # namespace/pod labels from pod-resources
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["pod-resources"] == "/var/lib/kubelet/pod-resources"
    counters_file = container["args"][container["args"].index("-f") + 1]
    assert counters_file == f"{mounts['counters']}/counters.csv"
    fields = {
        line.split(",")[0].strip()
        for line in _named(objs, "ConfigMap", "-dcgm-exporter")["data"]["counters.csv"].splitlines()
    }
    used = set(re.findall(r"\bDCGM_FI_[A-Z0-9_]+\b", DASHBOARD.read_text()))
    assert used and used <= fields, used - fields
    sm, svc = _named(objs, "ServiceMonitor", "-dcgm-exporter"), _named(objs, "Service", "-dcgm-exporter")
    errors = list(crd_validators()[(sm["apiVersion"], "ServiceMonitor")].iter_errors(sm))
    assert not errors, errors
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True and endpoint["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    for obj in (ds, svc, _named(objs, "ConfigMap", "-dcgm-exporter")):
        kubernetes_validate.validate(obj, "1.33.0", strict=True)
    report = helm.lint(
        ROOT / "deploy" / "helm" / "sdfleet",
        merge(merge(SETS["aws-diffusers"], DCGM_ON), ADOT_ON),
        strict=True,
        kube_version="v1.33.0",
    )
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report


@pytest.mark.parametrize(
    "bad",
    [
        {"adot": {"enabled": True, "metrics": {"scrapeInterval": "often"}}},
        {"adot": {"enabled": True, "tracing": True}},
        {"dcgmExporter": {"enabled": True, "counters": ["GPU_UTIL"]}},
        {"dcgmExporter": {"enabled": True, "port": 0}},
    ],
)
def test_schema_refuses_bad_observability_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(merge(SETS["redis"], bad))


# --- the CDK role of the collector ----------------------------------------------------------------


def test_cdk_role_trusts_the_collector_and_grants_what_its_exporters_call(tmp_path: Any) -> None:
    import importlib.util
    import sys

    cdk_dir = ROOT / "deploy" / "cdk"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION", "1")
        mp.setenv("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
        mp.syspath_prepend(str(cdk_dir))
        spec = importlib.util.spec_from_file_location("sdfleet_cdk_app_adot", cdk_dir / "app.py")
        assert spec is not None and spec.loader is not None
        app_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(app_module)
        import aws_cdk as cdk
        from aws_cdk.assertions import Template

        fleet = tmp_path / "sdfleet.yaml"
        fleet.write_text("queues: [{name: sd15}]\n")
        oidc = "arn:aws:iam::123456789012:oidc-provider/oidc.eks.eu-west-1.amazonaws.com/id/ABC"
        context = {
            "config": str(fleet),
            "adot_collector": "true",
            "eks_oidc_provider_arn": oidc,
            "release": RELEASE,
            "namespace": NAMESPACE,
        }
        app = cdk.App(context=context, outdir=str(tmp_path / "out"))
        template = Template.from_stack(app_module.build(app)).to_json()
        sys.modules.pop("sdfleet_cdk_app_adot", None)
    (role,) = [
        r["Properties"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::IAM::Role" and r["Properties"]["Description"].startswith("sdfleet adot ")
    ]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    sub = trust["Condition"]["StringEquals"]["oidc.eks.eu-west-1.amazonaws.com/id/ABC:sub"]
    objs = render(merge(SETS["aws-diffusers"], ADOT_ON))
    assert (
        sub
        == f"system:serviceaccount:{NAMESPACE}:{_named(objs, 'ServiceAccount', '-adot')['metadata']['name']}"
    )
    grants: dict[str, list[Any]] = {}
    for st in role["Policies"][0]["PolicyDocument"]["Statement"]:
        for action in st["Action"] if isinstance(st["Action"], list) else [st["Action"]]:
            grants.setdefault(action, []).extend(
                st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            )
    assert {
        "xray:PutTraceSegments",
        "xray:PutTelemetryRecords",
        "xray:GetSamplingRules",
        "xray:GetSamplingTargets",
    } <= set(grants)
    assert grants["xray:PutTraceSegments"] == ["*"]
    group = _collector(objs)["exporters"]["awsemf"]["log_group_name"]
    for action in ("logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"):
        text = json.dumps(grants[action])
        assert f"log-group:{group}" in text and f"log-group:{group}:log-stream:*" in text, (action, text)
    assert not [a for a in grants if a.startswith("logs:") and "*" == grants[a]], "logs scoped to the group"
    assert "AdotRoleArn" in template["Outputs"]
