"""The ValidatingAdmissionPolicy that narrows the worker service account's pod patches
(agent.podPatchPolicy): its CEL, as rendered by the chart, evaluated with Google's CEL runtime
(cel-expr-python) on pods built from the rendered worker Deployment, as the API server would
(``object``, ``oldObject``, ``request``, then ``variables`` in order)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from cel_expr_python import cel
from k8s_checks import by_name, of_kind, pod_spec, render, value_sets

COST = "controller.kubernetes.io/pod-deletion-cost"
SETS = value_sets()


def _eval(expression: str, bindings: dict[str, Any]) -> Any:
    names = ("object", "oldObject", "request", "variables")
    env = cel.NewEnv(variables={n: cel.Type.DYN for n in names})
    value = env.compile(expression).eval(env.Activation({n: bindings.get(n, {}) for n in names}))
    return value.plain_value()


def admit(
    policy: dict[str, Any], new: dict[str, Any], old: dict[str, Any], user: str, pod: str | None
) -> list[str]:
    """The messages of the validations that fail; [] when admitted or when the policy does not apply."""
    spec = policy["spec"]
    extra = {"authentication.kubernetes.io/pod-name": [pod]} if pod else {}
    bindings: dict[str, Any] = {
        "object": new,
        "oldObject": old,
        "request": {"userInfo": {"username": user, "extra": extra}},
    }
    if not all(_eval(c["expression"], bindings) for c in spec.get("matchConditions", [])):
        return []
    bindings["variables"] = {}
    for v in spec.get("variables", []):
        bindings["variables"][v["name"]] = _eval(v["expression"], bindings)
    return [v["message"] for v in spec["validations"] if not _eval(v["expression"], bindings)]


@pytest.fixture(scope="module")
def rendered() -> tuple[dict[str, Any], dict[str, Any], str]:
    objs = render(SETS["redis"])
    (policy,) = of_kind(objs, "ValidatingAdmissionPolicy")
    worker = next(d for name, d in by_name(objs, "Deployment").items() if not name.endswith("-api"))
    spec = pod_spec(worker)
    template = worker["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "fleet-sdfleet-q-5c7d9-aaaaa",
            "namespace": "sd",
            "labels": dict(template["metadata"]["labels"]),
            "annotations": dict(template["metadata"].get("annotations") or {}),
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "fleet-sdfleet-q-5c7d9", "uid": "u1"}
            ],
        },
        "spec": copy.deepcopy(spec),
    }
    (binding,) = of_kind(objs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    user = f"system:serviceaccount:sd:{spec['serviceAccountName']}"
    return policy, pod, user


def _with(pod: dict[str, Any], change: Any) -> dict[str, Any]:
    new = copy.deepcopy(pod)
    change(new)
    return new


def test_the_worker_may_set_its_own_pods_deletion_cost(rendered: Any) -> None:
    policy, pod, user = rendered
    marked = _with(pod, lambda p: p["metadata"]["annotations"].update({COST: "1000"}))
    assert admit(policy, marked, pod, user, pod["metadata"]["name"]) == []
    idle = _with(marked, lambda p: p["metadata"]["annotations"].update({COST: "0"}))
    assert admit(policy, idle, marked, user, pod["metadata"]["name"]) == []
    bare = _with(pod, lambda p: p["metadata"].pop("annotations"))
    first = _with(bare, lambda p: p["metadata"].update({"annotations": {COST: "1000"}}))
    assert admit(policy, first, bare, user, None) == [], "a token that does not name its pod"


@pytest.mark.parametrize(
    "what",
    ["image", "label", "annotation added", "annotation removed", "finalizer", "owner", "other pod"],
)
def test_the_worker_may_change_nothing_else(rendered: Any, what: str) -> None:
    policy, pod, user = rendered
    pod = _with(pod, lambda p: p["metadata"]["annotations"].update({"keep": "me"}))
    changes = {
        "image": lambda p: p["spec"]["containers"][0].update({"image": "evil.example/miner:1"}),
        "label": lambda p: p["metadata"]["labels"].update({"app.kubernetes.io/component": "api"}),
        "annotation added": lambda p: p["metadata"]["annotations"].update({"other": "x"}),
        "annotation removed": lambda p: p["metadata"]["annotations"].pop("keep"),
        "finalizer": lambda p: p["metadata"].update({"finalizers": ["example.com/hold"]}),
        "owner": lambda p: p["metadata"].update({"ownerReferences": []}),
        "other pod": lambda p: p["metadata"]["annotations"].update({COST: "1000"}),
    }
    new = _with(pod, changes[what])
    own = "fleet-sdfleet-api-6b8f-zzzzz" if what == "other pod" else pod["metadata"]["name"]
    assert admit(policy, new, pod, user, own), f"{what}: must be refused"


def test_other_users_are_not_its_concern(rendered: Any) -> None:
    policy, pod, _user = rendered
    new = _with(pod, lambda p: p["spec"]["containers"][0].update({"image": "registry.example/agent:2"}))
    for someone in ("kubernetes-admin", "system:serviceaccount:kube-system:replicaset-controller"):
        assert admit(policy, new, pod, someone, None) == []


def test_off_with_the_deletion_cost() -> None:
    from k8s_checks import merge

    objs = render(merge(SETS["redis"], {"agent": {"podDeletionCost": False}}))
    assert not of_kind(objs, "ValidatingAdmissionPolicy") and not of_kind(
        objs, "ValidatingAdmissionPolicyBinding"
    )
