"""Rendering the chart offline and checking objects: Kubernetes schemas, pinned CRD schemas, tolerations."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import yaml

from sdfleet.deploy import chart_values
from sdfleet.settings import FleetConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "sdfleet"
CRDS = Path(__file__).resolve().parent / "crds"
K8S_VERSIONS = ["1.30.0", "1.31.0", "1.32.0", "1.33.0"]
CRD_GROUPS = {"keda.sh", "karpenter.sh", "karpenter.k8s.aws", "monitoring.coreos.com", "elbv2.k8s.aws"}
RELEASE = "fleet"
NAMESPACE = "sd"
REGION = "eu-west-1"
ACCOUNT = "123456789012"

CLUSTER = {
    "karpenter": {
        "clusterName": "gpu-cluster",
        "nodeRole": "KarpenterNodeRole-gpu-cluster",
        "amiAlias": "bottlerocket@v1.44.0",
        "dataVolume": {"snapshotID": "snap-0123456789abcdef0"},
    },
    "serviceAccounts": {
        "api": {"roleArn": f"arn:aws:iam::{ACCOUNT}:role/sdfleet-api"},
        "worker": {"roleArn": f"arn:aws:iam::{ACCOUNT}:role/sdfleet-worker"},
    },
    "secrets": {"existingSecret": "sdfleet-env"},
    "urls": {"storage": "s3://acme-results/out"},
}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def fleet(*queues: dict[str, Any]) -> FleetConfig:
    return FleetConfig.model_validate({"queues": list(queues), "retry": {"lease_s": 60, "max_receives": 3}})


def value_sets() -> dict[str, dict[str, Any]]:
    """The value sets every test runs on: built by ``chart_values`` (what ``sdfleet deploy values``
    prints) plus cluster settings, as an operator would layer two ``-f`` files."""
    aws = chart_values(
        fleet(
            {"name": "sd15", "filter": {"sd_model_checkpoint": ["v1-5.safetensors"]}, "scaling": {"max": 8}},
            {"name": "dynamic", "scaling": {"max": 4, "target_backlog": 3}},
        ),
        engine="aws",
        region=REGION,
        account=ACCOUNT,
    )
    redis = chart_values(
        fleet({"name": "sd15", "filter": {"sd_model_checkpoint": ["v1-5.safetensors"]}}, {"name": "burst"}),
        engine="redis",
        prefix="fleet1",
        redis_address="redis.sd.svc:6379",
        drain_s=90,
    )
    redis["queues"][1]["mode"] = "job"
    redis_extra = {
        "redis": {"passwordSecret": {"name": "redis-auth", "key": "password"}},
        "models": {"volume": {"type": "s3", "s3": {"bucket": "models-bucket", "region": REGION}}},
    }
    a1111 = chart_values(
        fleet({"name": "webui", "runtime": "a1111"}), engine="aws", region=REGION, account=ACCOUNT
    )
    comfy = chart_values(
        fleet({"name": "pipelines", "runtime": "comfyui"}), engine="redis", redis_address="redis:6379"
    )
    return {
        "aws-diffusers": merge(aws, CLUSTER),
        "redis": merge(merge(redis, CLUSTER), redis_extra),
        "a1111-sidecar": merge(
            a1111, merge(CLUSTER, {"api": {"ingress": {"enabled": True, "host": "sd.x"}}})
        ),
        "comfyui-sidecar": merge(comfy, CLUSTER),
    }


def render(
    values: dict[str, Any], release: str = RELEASE, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """Every object the chart renders for ``values`` (Helm's own engine, no cluster)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=values, name=release, namespace=namespace)
    return [
        obj
        for name, text in sorted(manifests.items())
        if name.endswith(".yaml")
        for obj in yaml.safe_load_all(text)
        if obj
    ]


def _strict(schema: Any) -> Any:
    """Refuse unknown fields as ``kubectl --validate=strict`` does (the API server would prune them)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) → validator of the served version's openAPIV3Schema, from tests/deploy/crds."""
    validators: dict[tuple[str, str], jsonschema.protocols.Validator] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = _strict(version["schema"]["openAPIV3Schema"])
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def is_custom(obj: dict[str, Any]) -> bool:
    return obj["apiVersion"].split("/")[0] in CRD_GROUPS


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def by_name(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in of_kind(objs, kind)}


def tolerates(tolerations: list[dict[str, Any]], taint: dict[str, Any]) -> bool:
    """Kubernetes' toleration matching for one taint."""
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint["effect"]:
            continue
        if t.get("key") and t["key"] != taint["key"]:
            continue
        if t.get("operator", "Equal") == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "ScaledJob":
        return workload["spec"]["jobTargetRef"]["template"]["spec"]  # type: ignore[no-any-return]
    return workload["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def workers(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        o
        for o in objs
        if o["kind"] in ("Deployment", "ScaledJob")
        and o["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    ]
