"""What the rendered objects do (issue 14, defects 2, 6 and 8): results storage every pod shares,
/metrics off the public port and the Ingress, an ALB that can reach and health-check the pods,
bounded GPU node pools, the models bucket read with the pod's identity, the ensure hook Job."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import httpx
import pytest
import yaml
from k8s_checks import by_name, merge, of_kind, render, value_sets

from sdfleet.api.app import create_app
from sdfleet.api.ops import create_ops_app
from sdfleet.build import Engines, api_context
from sdfleet.settings import ApiSettings, Settings

SETS = value_sets()
ALB = {
    "api": {
        "ingress": {
            "enabled": True,
            "className": "alb",
            "host": "sd.example.com",
            "certificateArn": "arn:aws:acm:eu-west-1:123456789012:certificate/abc",
        }
    }
}


def _without_storage(values: dict[str, Any]) -> dict[str, Any]:
    out = merge(values, {})
    out["urls"].pop("storage")
    return out


@pytest.mark.parametrize("name", sorted(SETS))
def test_results_storage_must_be_shared(name: str) -> None:
    with pytest.raises(helm.HelmValuesError, match="storage"):
        render(_without_storage(SETS[name]))
    with pytest.raises(helm.HelmValuesError):
        render(merge(SETS[name], {"urls": {"storage": "file:///tmp/files"}}))
    local = merge(_without_storage(SETS[name]), {"allowLocalStorage": True})
    assert render(local)


def _public_backend(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    (ingress,) = of_kind(objs, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    service = by_name(objs, "Service")[backend["name"]]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == backend["port"]["name"]]
    api = by_name(objs, "Deployment")["fleet-sdfleet-api"]["spec"]["template"]["spec"]["containers"][0]
    (container_port,) = [p["containerPort"] for p in api["ports"] if p["name"] == port["targetPort"]]
    return ingress, container_port


async def test_alb_reaches_the_pods_and_never_serves_metrics(tmp_path: Any) -> None:
    objs = render(merge(SETS["aws-diffusers"], ALB))
    ingress, public_port = _public_backend(objs)
    notes = ingress["metadata"]["annotations"]
    assert by_name(objs, "Service")["fleet-sdfleet-api"]["spec"]["type"] == "ClusterIP"
    assert notes["alb.ingress.kubernetes.io/target-type"] == "ip", "instance targets need a NodePort Service"
    assert notes["alb.ingress.kubernetes.io/scheme"] == "internet-facing"
    assert "HTTPS" in notes["alb.ingress.kubernetes.io/listen-ports"]
    api = by_name(objs, "Deployment")["fleet-sdfleet-api"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in api["env"]}
    ops_port = int(env["SDFLEET_API__OPS_PORT"])
    assert ops_port != public_port
    # The app the container runs, with that environment: health checks pass, /metrics is not public.
    settings = Settings(data_dir=tmp_path, api=ApiSettings(ops_port=ops_port))
    engines = Engines(settings)
    await engines.ensure()
    try:
        ctx = api_context(settings, engines)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(create_app(ctx)), base_url="http://a"
        ) as c:
            assert (await c.get(notes["alb.ingress.kubernetes.io/healthcheck-path"])).status_code == 200
            assert (await c.get("/metrics")).status_code == 404
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(create_ops_app(ctx)), base_url="http://o"
        ) as c:
            assert (await c.get("/metrics")).status_code == 200
            depth = (await c.get(f"/queues/{settings.fleet.queues[0].name}/depth")).json()
            assert depth["depth"] == depth["visible"] + depth["in_flight"] + depth["delayed"] == 0
            assert (await c.get("/queues/nope/depth")).status_code == 404
    finally:
        await engines.aclose()


def test_node_pools_bound_node_size_and_total_capacity() -> None:
    for pool in of_kind(render(SETS["aws-diffusers"]), "NodePool"):
        reqs = {r["key"]: r for r in pool["spec"]["template"]["spec"]["requirements"]}
        gpus = reqs["karpenter.k8s.aws/instance-gpu-count"]
        assert gpus["operator"] == "Lt" and gpus["values"] == ["2"], "one GPU per node by default"
        assert reqs["karpenter.k8s.aws/instance-size"]["operator"] == "In"
        assert "metal" not in reqs["karpenter.k8s.aws/instance-size"]["values"]
        assert {"nvidia.com/gpu", "cpu", "memory"} <= set(pool["spec"]["limits"])


def test_models_bucket_is_read_with_the_pods_identity() -> None:
    (pv,) = of_kind(render(SETS["redis"]), "PersistentVolume")
    assert pv["spec"]["csi"]["volumeAttributes"]["authenticationSource"] == "pod"


def test_ensure_hook_runs_before_the_release_with_the_fleet_file() -> None:
    objs = render(SETS["redis"])
    (job,) = of_kind(objs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][:3] == ["ensure", "--config", "/etc/sdfleet/sdfleet.yaml"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    hook_cm = by_name(objs, "ConfigMap")[volumes["fleet"]["configMap"]["name"]]
    assert "helm.sh/hook" in hook_cm["metadata"]["annotations"], "exists before pre-install hooks run"
    release_cm = by_name(objs, "ConfigMap")["fleet-sdfleet-fleet"]
    assert yaml.safe_load(hook_cm["data"]["sdfleet.yaml"]) == yaml.safe_load(
        release_cm["data"]["sdfleet.yaml"]
    )
    assert not of_kind(render(SETS["aws-diffusers"]), "Job"), "aws: the CDK app owns the topology"


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_worker_may_patch_its_own_pod_for_deletion_cost(name: str) -> None:
    """agent.podDeletionCost (default on): each worker's agent knows its pod (downward API) and its
    service account is bound to a Role that may patch pods in the release's namespace."""
    from k8s_checks import pod_spec

    objs = render(SETS[name])
    (role,) = [r for r in of_kind(objs, "Role") if r["metadata"]["name"].endswith("-worker-pods")]
    assert {"patch"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["pods"]
    bound = {
        s["name"]
        for b in of_kind(objs, "RoleBinding")
        if b["roleRef"]
        == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
        for s in b["subjects"]
        if s["kind"] == "ServiceAccount"
    }
    workers = [
        o for o in objs if o["kind"] in ("Deployment", "ScaledJob") and "-api" not in o["metadata"]["name"]
    ]
    assert workers
    for w in workers:
        spec = pod_spec(w)
        assert spec["serviceAccountName"] in bound, w["metadata"]["name"]
        agent = next(c for c in spec["containers"] if c["name"] == "agent")
        env = {e["name"]: e for e in agent["env"]}
        assert env["SDFLEET_AGENT__POD_DELETION_COST"]["value"] == "true"
        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    off = render(merge(SETS[name], {"agent": {"podDeletionCost": False}}))
    assert not [r for r in of_kind(off, "Role") if r["metadata"]["name"].endswith("-worker-pods")]
    assert "POD_NAME" not in str([pod_spec(w) for w in off if w["kind"] == "Deployment"])
