"""The Helm chart, rendered offline for four value sets: schemas, lint, and the wiring between
queues, scalers, workers and GPU node pools."""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from k8s_checks import (
    ACCOUNT,
    CHART,
    K8S_VERSIONS,
    REGION,
    by_name,
    crd_validators,
    is_custom,
    of_kind,
    pod_spec,
    render,
    tolerates,
    value_sets,
    workers,
)

from sdfleet.bus.backends.aws_topology import queue_name
from sdfleet.bus.backends.redis import stream_names
from sdfleet.deploy import DEFAULT_PREFIX, SIDECAR_PORTS, sqs_queue_url

SETS = value_sets()
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|SIGNING_KEY|API_KEY|ACCESS_KEY", re.I)


@pytest.fixture(scope="module", params=sorted(SETS))
def case(request: pytest.FixtureRequest) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    values = SETS[request.param]
    return values, render(values)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _agent(spec: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in spec["containers"] if c["name"] == "agent")


def test_lint_is_clean_for_every_value_set() -> None:
    for name, values in SETS.items():
        for kube in ("v1.30.0", "v1.33.0"):
            report = helm.lint(CHART, values, strict=True, kube_version=kube)
            problems = [m for m in report["messages"] if m["severity"] >= 2]
            assert not report["errors"] and not problems, (name, kube, report)


def test_builtin_objects_validate_on_kubernetes_1_30_to_1_33(case: Any) -> None:
    _, objs = case
    builtin = [o for o in objs if not is_custom(o)]
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= {o["kind"] for o in builtin}
    for obj in builtin:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_keda_and_karpenter_objects_validate_against_pinned_crds(case: Any) -> None:
    _, objs = case
    validators = crd_validators()
    custom = [o for o in objs if is_custom(o)]
    assert {"EC2NodeClass", "NodePool"} <= {o["kind"] for o in custom}
    for obj in custom:
        validator = validators[(obj["apiVersion"], obj["kind"])]
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
        assert not errors, (obj["kind"], obj["metadata"]["name"], errors)


def test_crd_validation_refuses_unknown_and_wrong_fields() -> None:
    so = of_kind(render(SETS["aws-diffusers"]), "ScaledObject")[0]
    validator = crd_validators()[("keda.sh/v1alpha1", "ScaledObject")]
    assert not list(validator.iter_errors(so))
    assert list(validator.iter_errors({**so, "spec": {**so["spec"], "cooldown": 60}}))
    assert list(validator.iter_errors({**so, "spec": {**so["spec"], "minReplicaCount": "zero"}}))


def _expected_trigger(values: dict[str, Any], queue: str) -> dict[str, str]:
    engine = values["engine"]
    prefix = re.search(r"prefix=([^&]+)", values["urls"]["bus"]).group(1)  # type: ignore[union-attr]
    if engine == "aws":
        return {"queueURL": sqs_queue_url(REGION, ACCOUNT, queue_name(prefix, queue))}
    stream, _ = stream_names(prefix, queue)
    return {"stream": stream}


def test_one_scaler_per_queue_targets_its_worker_and_its_queue(case: Any) -> None:
    values, objs = case
    deployments = by_name(objs, "Deployment")
    scalers = of_kind(objs, "ScaledObject") + of_kind(objs, "ScaledJob")
    queues = {q["name"] for q in values["queues"]}
    assert sorted(s["metadata"]["labels"]["sdfleet.io/queue"] for s in scalers) == sorted(queues)
    for s in scalers:
        queue = s["metadata"]["labels"]["sdfleet.io/queue"]
        if s["kind"] == "ScaledObject":
            target = deployments[s["spec"]["scaleTargetRef"]["name"]]
            agent = _agent(target["spec"]["template"]["spec"])
            assert s["spec"]["minReplicaCount"] == 0
        else:
            agent = _agent(s["spec"]["jobTargetRef"]["template"]["spec"])
            assert "--burst" in agent["args"]
        assert agent["args"][agent["args"].index("--queue") + 1] == queue
        trigger = s["spec"]["triggers"][-1]
        expected = _expected_trigger(values, queue)
        assert {k: trigger["metadata"][k] for k in expected} == expected
        assert trigger["type"] == ("aws-sqs-queue" if values["engine"] == "aws" else "redis-streams")


def test_scaling_numbers_come_from_the_fleet_file() -> None:
    objs = render(SETS["aws-diffusers"])
    so = {s["metadata"]["labels"]["sdfleet.io/queue"]: s for s in of_kind(objs, "ScaledObject")}
    assert so["sd15"]["spec"]["maxReplicaCount"] == 8
    assert so["dynamic"]["spec"]["maxReplicaCount"] == 4
    meta = so["dynamic"]["spec"]["triggers"][0]["metadata"]
    assert meta["queueLength"] == "3" and meta["awsRegion"] == REGION
    assert so["sd15"]["spec"]["pollingInterval"] == 1 and so["sd15"]["spec"]["cooldownPeriod"] == 60
    behavior = so["sd15"]["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 120
    (auth,) = of_kind(objs, "TriggerAuthentication")
    assert auth["spec"]["podIdentity"] == {"provider": "aws", "identityOwner": "keda"}
    assert so["sd15"]["spec"]["triggers"][0]["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_worker_tolerations_match_the_gpu_node_pools(case: Any) -> None:
    _, objs = case
    pools = of_kind(objs, "NodePool")
    classes = by_name(objs, "EC2NodeClass")
    for w in workers(objs):
        spec = pod_spec(w)
        matching = [
            p
            for p in pools
            if all(
                p["spec"]["template"]["metadata"]["labels"].get(k) == v
                for k, v in spec["nodeSelector"].items()
            )
        ]
        capacity = {
            r["values"][0]
            for p in matching
            for r in p["spec"]["template"]["spec"]["requirements"]
            if r["key"] == "karpenter.sh/capacity-type"
        }
        assert capacity == {"spot", "on-demand"}, w["metadata"]["name"]
        for p in matching:
            assert p["spec"]["template"]["spec"]["taints"], "GPU pools must be tainted"
            for taint in p["spec"]["template"]["spec"]["taints"]:
                assert tolerates(spec["tolerations"], taint), (w["metadata"]["name"], taint)
            assert p["spec"]["template"]["spec"]["nodeClassRef"]["name"] in classes
        weights = {
            r["values"][0]: p["spec"]["weight"]
            for p in matching
            for r in p["spec"]["template"]["spec"]["requirements"]
            if r["key"] == "karpenter.sh/capacity-type"
        }
        assert weights["spot"] > weights["on-demand"], "on-demand is the fallback"


def test_node_class_is_bottlerocket_with_the_data_volume_snapshot(case: Any) -> None:
    _, objs = case
    for nc in of_kind(objs, "EC2NodeClass"):
        assert nc["spec"]["amiSelectorTerms"] == [{"alias": "bottlerocket@v1.44.0"}]
        data = next(b for b in nc["spec"]["blockDeviceMappings"] if b["deviceName"] == "/dev/xvdb")
        assert data["ebs"]["snapshotID"] == "snap-0123456789abcdef0"
    for pool in of_kind(objs, "NodePool"):
        assert pool["spec"]["disruption"]["consolidationPolicy"] == "WhenEmpty"
        assert pool["spec"]["template"]["spec"]["expireAfter"] == "720h"
        assert pool["spec"]["limits"]["nvidia.com/gpu"]
        families = next(
            r
            for r in pool["spec"]["template"]["spec"]["requirements"]
            if r["key"].endswith("instance-family")
        )
        assert families["values"] == ["g5", "g4dn"]


def test_gpu_requested_by_the_container_that_runs_the_model(case: Any) -> None:
    _, objs = case
    for w in workers(objs):
        spec = pod_spec(w)
        sidecars = spec.get("initContainers", [])
        runner = sidecars[0] if sidecars else _agent(spec)
        assert runner["resources"]["limits"]["nvidia.com/gpu"] >= 1
        if sidecars:
            assert "nvidia.com/gpu" not in _agent(spec)["resources"].get("limits", {})


def test_grace_period_covers_the_agents_drain(case: Any) -> None:
    values, objs = case
    timeouts = {q["name"]: q["task_timeout_s"] for q in values["fleet"]["queues"]}
    for w in workers(objs):
        drain = timeouts[w["metadata"]["labels"]["sdfleet.io/queue"]]  # the queue's longest task
        spec = pod_spec(w)
        agent = _agent(spec)
        assert float(_env(agent)["SDFLEET_AGENT__DRAIN_S"]["value"]) == drain
        pre_stop = agent.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_stop_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        assert spec["terminationGracePeriodSeconds"] >= drain + pre_stop_s + 5
        for sidecar in spec.get("initContainers", []):
            assert sidecar["restartPolicy"] == "Always", "the runtime must outlive the agent's drain"


def test_probes_read_the_agents_ready_and_heartbeat_files(case: Any) -> None:
    _, objs = case
    for w in workers(objs):
        agent = _agent(pod_spec(w))
        args = agent["args"]
        base = f"{args[args.index('--ready-dir') + 1]}/{args[args.index('--queue') + 1]}"
        for probe in ("startupProbe", "readinessProbe"):
            assert agent[probe]["exec"]["command"] == ["test", "-f", f"{base}.ready"]
        live = agent["livenessProbe"]["exec"]["command"]
        assert live[:2] == ["python", "-c"] and f"getmtime('{base}.alive')" in live[2]
        mounts = {m["mountPath"] for m in agent["volumeMounts"]}
        assert args[args.index("--ready-dir") + 1] in mounts


def test_no_secret_in_plain_values(case: Any) -> None:
    _, objs = case
    assert not of_kind(objs, "Secret")
    for obj in objs:
        spec = obj["spec"] if obj["kind"] in ("Deployment",) else None
        if spec is None and obj["kind"] == "ScaledJob":
            spec = obj["spec"]["jobTargetRef"]
        if spec is None:
            continue
        for c in spec["template"]["spec"]["containers"] + spec["template"]["spec"].get("initContainers", []):
            for e in c.get("env", []):
                if SECRETISH.search(e["name"]):
                    assert "valueFrom" in e, e
                value = str(e.get("value", "")).replace(":$(SDFLEET_REDIS_PASSWORD)@", "")
                assert not re.search(r"://[^/?#]*@", value), e
            assert c.get("envFrom", [{"secretRef": {"name": "sdfleet-env"}}]) == [
                {"secretRef": {"name": "sdfleet-env"}}
            ]


@pytest.mark.parametrize(
    "bad",
    [
        {"env": {"SDFLEET_API__SIGNING_KEY": "hunter2"}},
        {"urls": {"bus": "redis://:hunter2@redis:6379/0"}},
        {"redis": {"password": "hunter2"}},
        {"apiKey": "hunter2"},
    ],
)
def test_schema_refuses_secrets_in_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render({**SETS["redis"], **bad})


@pytest.mark.parametrize("address", ["redis-master.redis", "redis://r:6379", "r:"])
def test_schema_refuses_a_redis_address_keda_cannot_dial(address: str) -> None:
    with pytest.raises(helm.HelmValuesError):
        render({**SETS["redis"], "redis": {**SETS["redis"]["redis"], "address": address}})
    render({**SETS["redis"], "redis": {**SETS["redis"]["redis"], "address": "[fd00::1]:6379"}})


def test_redis_uses_the_password_secret_and_the_queue_depth() -> None:
    objs = render(SETS["redis"])
    (auth,) = of_kind(objs, "TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "redis-auth", "key": "password"}
    ]
    so = of_kind(objs, "ScaledObject")[0]
    depth, xlen = so["spec"]["triggers"]
    assert depth["type"] == "metrics-api" and depth["metadata"]["valueLocation"] == "depth"
    assert (
        depth["metadata"]["url"] == "http://fleet-sdfleet-api-ops.sd.svc.cluster.local:9090/queues/sd15/depth"
    )
    assert xlen["metadata"]["streamLength"] == "10" and xlen["metadata"]["address"] == "redis.sd.svc:6379"
    assert "consumerGroup" not in xlen["metadata"], "with a group KEDA would count XPENDING instead"
    assert xlen["authenticationRef"]["name"] == auth["metadata"]["name"]
    pv = of_kind(objs, "PersistentVolume")[0]
    assert pv["spec"]["csi"]["driver"] == "s3.csi.aws.com"
    assert pv["spec"]["csi"]["volumeAttributes"]["bucketName"] == "models-bucket"


@pytest.mark.parametrize("set_name,runtime", [("a1111-sidecar", "a1111"), ("comfyui-sidecar", "comfyui")])
def test_sidecar_runtime_is_where_the_fleet_file_says(set_name: str, runtime: str) -> None:
    objs = render(SETS[set_name])
    cm = by_name(objs, "ConfigMap")["fleet-sdfleet-fleet"]
    fleet_file = yaml.safe_load(cm["data"]["sdfleet.yaml"])
    port = SIDECAR_PORTS[runtime]
    assert fleet_file["runtimes"][runtime]["url"] == f"http://127.0.0.1:{port}"
    (w,) = workers(objs)
    spec = pod_spec(w)
    (sidecar,) = spec["initContainers"]
    assert sidecar["ports"][0]["containerPort"] == port
    agent = _agent(spec)
    assert agent["image"].startswith("ghcr.io/example/sdfleet-agent:")
    assert agent["args"][agent["args"].index("--runtime-url") + 1] == f"http://127.0.0.1:{port}"
    assert {"mountPath": "/models", "name": "models", "readOnly": True} in sidecar["volumeMounts"]
    # The server listens on the pod's loopback only (neither has authentication), on the port above.
    args = sidecar["args"]
    assert args[args.index("--port") + 1] == str(port)
    if runtime == "a1111":  # its --listen is a bare flag for 0.0.0.0
        assert "--listen" not in args and args[args.index("--server-name") + 1] == "127.0.0.1"
        # sdfleet's models folder is SD WebUI's models/ without the Stable-diffusion/ level
        assert args[args.index("--ckpt-dir") + 1] == "/models"
        assert args[args.index("--lora-dir") + 1] == "/models/Lora"
    else:
        assert args[args.index("--listen") + 1] == "127.0.0.1"


@pytest.mark.parametrize("set_name,runtime", [("a1111-sidecar", "a1111"), ("comfyui-sidecar", "comfyui")])
def test_sidecar_probes_reach_a_server_on_the_pods_loopback(set_name: str, runtime: str) -> None:
    """The kubelet's httpGet probes go to the pod's IP, where a server on 127.0.0.1 never answers:
    the side-car's probes run a command in its container. Run here against a server on 127.0.0.1."""
    objs = render(SETS[set_name])
    (sidecar,) = pod_spec(workers(objs)[0])["initContainers"]
    health = {"a1111": "/sdapi/v1/sd-models", "comfyui": "/system_stats"}[runtime]

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == health else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    for name in ("startupProbe", "livenessProbe"):
        probe = sidecar[name]
        assert "httpGet" not in probe and probe["timeoutSeconds"] >= 5, probe
        command = probe["exec"]["command"]
        assert command[0] == "python3" and command[-1] == f"http://127.0.0.1:{SIDECAR_PORTS[runtime]}{health}"
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = command[-1].replace(f":{SIDECAR_PORTS[runtime]}/", f":{server.server_address[1]}/")
            run = [sys.executable, *command[1:-1]]
            assert subprocess.run([*run, url], capture_output=True, timeout=30).returncode == 0
            wrong = url.replace(health, "/missing")
            assert subprocess.run([*run, wrong], capture_output=True, timeout=30).returncode != 0
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
        closed = subprocess.run([*run, url], capture_output=True, timeout=30)
        assert closed.returncode != 0, "a server that is down fails the probe"


def test_service_accounts_carry_irsa_roles() -> None:
    objs = render(SETS["aws-diffusers"])
    accounts = by_name(objs, "ServiceAccount")
    for role in ("api", "worker"):
        sa = accounts[f"fleet-sdfleet-{role}"]
        assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(f"role/sdfleet-{role}")
    for w in workers(objs):
        assert pod_spec(w)["serviceAccountName"] == "fleet-sdfleet-worker"


def test_chart_refuses_a_queue_the_fleet_file_lacks() -> None:
    values = {**SETS["aws-diffusers"], "queues": [*SETS["aws-diffusers"]["queues"], {"name": "ghost"}]}
    with pytest.raises(helm.HelmError, match="ghost"):
        render(values)


def test_chart_refuses_a_trigger_without_queue_url() -> None:
    values = {**SETS["aws-diffusers"], "queues": [{"name": "sd15"}]}
    with pytest.raises(helm.HelmError, match="queueURL"):
        render(values)


def test_default_prefixes_are_the_engines() -> None:
    import inspect

    from sdfleet import _redis
    from sdfleet.bus.backends.aws import AwsBus

    aws_default = inspect.signature(AwsBus.__init__).parameters["prefix"].default
    assert DEFAULT_PREFIX == {"aws": aws_default, "redis": _redis.DEFAULT_PREFIX}
    assert "prefix=sdfleet-&" in SETS["aws-diffusers"]["urls"]["bus"]


def test_the_on_demand_fallback_can_have_its_own_bound() -> None:
    """Karpenter limits each NodePool on its own: with one `limits` the class could reach twice it."""
    values = SETS["aws-diffusers"]
    classes = values.get("karpenter", {}).get("gpuClasses") or {"gpu": {}}

    def gpu_limits(objs: list[dict[str, Any]]) -> dict[str, str]:
        return {
            p["metadata"]["name"].rsplit("-", 1)[-1]: p["spec"]["limits"]["nvidia.com/gpu"]
            for p in of_kind(objs, "NodePool")
        }

    assert set(gpu_limits(render(values)).values()) == {"16"}, "each pool has the class's limits"
    floor = {"nvidia.com/gpu": "4", "cpu": "64", "memory": "256Gi"}
    with_floor = {
        **values,
        "karpenter": {
            **values.get("karpenter", {}),
            "gpuClasses": {name: {**c, "onDemandLimits": floor} for name, c in classes.items()},
        },
    }
    limits = gpu_limits(render(with_floor))
    assert limits == {"spot": "16", "demand": "4"}, limits
