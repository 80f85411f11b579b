"""The settings ``sdfleet simulate`` chose, through ``deploy values --simulated``, rendered by the chart."""

from __future__ import annotations

from pathlib import Path

import yaml
from k8s_checks import ACCOUNT, CLUSTER, REGION, fleet, merge, of_kind, render

from sdfleet.deploy import apply_simulated, chart_values


def test_the_chart_renders_the_simulated_scaling(tmp_path: Path) -> None:
    chosen = tmp_path / "chosen.yaml"
    down = {
        "stabilizationWindowSeconds": 60,
        "policies": [{"type": "Percent", "value": 50, "periodSeconds": 30}],
    }
    scaling = {
        "maxReplicaCount": 40,
        "targetBacklog": 5,
        "cooldownPeriod": 90,
        "behavior": {"scaleDown": down},
    }
    karpenter = {"gpuClasses": {"gpu": {"consolidateAfter": "45s", "onDemandFallback": False}}}
    chosen.write_text(yaml.safe_dump({"queues": {"sd15": scaling}, "karpenter": karpenter}))
    values = chart_values(
        fleet(
            {"name": "sd15", "filter": {"sd_model_checkpoint": ["sd15.safetensors"]}, "scaling": {"max": 8}},
            {"name": "dynamic"},
        ),
        engine="aws",
        region=REGION,
        account=ACCOUNT,
    )
    objs = render(merge(apply_simulated(values, chosen), CLUSTER))
    scaled = {o["metadata"]["name"].rsplit("-", 1)[-1]: o for o in of_kind(objs, "ScaledObject")}
    spec = scaled["sd15"]["spec"]
    assert (spec["maxReplicaCount"], spec["cooldownPeriod"]) == (40, 90)
    assert spec["triggers"][0]["metadata"]["queueLength"] == "5"
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == down
    assert scaled["dynamic"]["spec"]["maxReplicaCount"] == 10  # untouched
    pools = {o["metadata"]["name"] for o in of_kind(objs, "NodePool")}
    assert not any(name.endswith("on-demand") for name in pools)  # the fallback pool is off
    assert {o["spec"]["disruption"]["consolidateAfter"] for o in of_kind(objs, "NodePool")} == {"45s"}
