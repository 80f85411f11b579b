"""The cluster stack (``-c cluster=true``) synthesised for both identity modes in one app, with
cdk-nag's AwsSolutions checks: no unsuppressed finding, the pieces wired to one another, and the
sdfleet chart's values (with the stack's tokens given concrete shapes) rendering and validating."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from k8s_checks import by_name, crd_validators, is_custom, of_kind, render
from test_cdk import EXAMPLE, _load_cdk

from sdfleet.settings import load_fleet

MODES = ("pod-identity", "irsa")
ACCOUNT, REGION = "123456789012", "eu-west-1"


@pytest.fixture(scope="module")
def stacks() -> Iterator[dict[str, Any]]:
    """One app, both modes, nag aspect on: synthesised once for the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION", "1")
        mp.setenv("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
        _load_cdk()
        import aws_cdk as cdk
        from aws_cdk.assertions import Annotations, Match, Template
        from cdk_nag import AwsSolutionsChecks
        from sdfleet_cluster import ClusterOptions
        from sdfleet_stack import SdfleetStack

        app = cdk.App()
        env = cdk.Environment(account=ACCOUNT, region=REGION)
        out: dict[str, Any] = {}
        for mode in MODES:
            options = ClusterOptions(
                identity=mode,  # type: ignore[arg-type]
                domain="sd.example.com",
                certificate_arn=f"arn:aws:acm:{REGION}:{ACCOUNT}:certificate/abc",
            )
            stack = SdfleetStack(app, f"sd-{mode}", fleet=load_fleet(EXAMPLE), cluster=options, env=env)
            out[mode] = {"stack": stack}
        cdk.Aspects.of(app).add(AwsSolutionsChecks())
        for mode in MODES:
            stack = out[mode]["stack"]
            out[mode]["template"] = Template.from_stack(stack).to_json()
            nag = Annotations.from_stack(stack)
            findings = [
                f"{m.id}: {m.entry.data[:120]}"
                for level in (nag.find_error, nag.find_warning)
                for m in level("*", Match.string_like_regexp("AwsSolutions-.*"))
            ]
            out[mode]["findings"] = findings
        yield out


def _of_type(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in template["Resources"].items() if r["Type"] == kind}


@pytest.mark.parametrize("mode", MODES)
def test_cdk_nag_aws_solutions_is_clean(stacks: dict[str, Any], mode: str) -> None:
    assert stacks[mode]["findings"] == []


def _chart(template: dict[str, Any], chart: str) -> dict[str, Any]:
    (props,) = [
        r["Properties"]
        for r in template["Resources"].values()
        if r["Type"] == "Custom::AWSCDK-EKS-HelmChart" and r["Properties"].get("Chart") == chart
    ]
    return props


def _role_of(template: dict[str, Any], description: str) -> str:
    (lid,) = [
        k
        for k, r in _of_type(template, "AWS::IAM::Role").items()
        if str(r["Properties"].get("Description", "")).startswith(description)
    ]
    return lid


@pytest.mark.parametrize("mode", MODES)
def test_cluster_pieces_are_wired(stacks: dict[str, Any], mode: str) -> None:
    t = stacks[mode]["template"]
    addons = {r["Properties"]["AddonName"] for r in _of_type(t, "AWS::EKS::Addon").values()}
    assert {"eks-pod-identity-agent", "aws-mountpoint-s3-csi-driver"} <= addons
    endpoints = _of_type(t, "AWS::EC2::VPCEndpoint").values()
    assert any("s3" in json.dumps(e["Properties"]["ServiceName"]) for e in endpoints)
    discovery = [
        r for r in _of_type(t, "AWS::EC2::Subnet").values()
        if {"Key": "karpenter.sh/discovery", "Value": f"sd-{mode}"} in r["Properties"].get("Tags", [])
    ]  # fmt: skip
    assert len(discovery) == 2, "the private subnets Karpenter places GPU nodes in"
    (queue,) = [k for k, r in _of_type(t, "AWS::SQS::Queue").items() if "interruption" in k]
    rules = [
        r
        for r in _of_type(t, "AWS::Events::Rule").values()
        if r["Properties"]["Targets"][0]["Arn"] == {"Fn::GetAtt": [queue, "Arn"]}
    ]
    assert len(rules) == 4
    karpenter, keda = _chart(t, "karpenter"), _chart(t, "keda")
    assert karpenter["Version"] == "1.14.1" and keda["Version"] == "2.20.2"
    assert {"Fn::GetAtt": [queue, "QueueName"]} in json.loads(json.dumps(karpenter["Values"]))["Fn::Join"][1]
    keda_role = _role_of(t, "sdfleet keda ")
    if mode == "irsa":
        assert {"Fn::GetAtt": [keda_role, "Arn"]} in keda["Values"]["Fn::Join"][1]
    else:
        associations = [r["Properties"] for r in _of_type(t, "AWS::EKS::PodIdentityAssociation").values()]
        by_sa = {(a["Namespace"], a["ServiceAccount"]): a["RoleArn"] for a in associations}
        assert by_sa[("keda", "keda-operator")] == {"Fn::GetAtt": [keda_role, "Arn"]}
        assert by_sa[("kube-system", "karpenter")] == {
            "Fn::GetAtt": [_role_of(t, "sdfleet karpenter "), "Arn"]
        }
    assert len(_of_type(t, "AWS::ECR::Repository")) == 3


# -- the sdfleet release's values, rendered -------------------------------------------------------

_TOKEN = re.compile(r"\$\{Token\[[^\]]+\]\}")


def _concrete(value: Any, stack: Any, template: dict[str, Any]) -> Any:
    """``value`` with each CDK token replaced by a string of the shape CloudFormation gives it."""
    if isinstance(value, dict):
        return {k: _concrete(v, stack, template) for k, v in value.items()}
    if isinstance(value, list):
        return [_concrete(v, stack, template) for v in value]
    if isinstance(value, str) and _TOKEN.search(value):
        return _cfn(stack.resolve(value), template)
    return value


def _cfn(node: Any, template: dict[str, Any]) -> str:
    if isinstance(node, str):
        return node
    ((fn, arg),) = node.items()
    if fn == "Fn::Join":
        return str(arg[0]).join(_cfn(p, template) for p in arg[1])
    if fn == "Ref":
        pseudo = {
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
        }
        if arg in pseudo:
            return pseudo[arg]
        kind = template["Resources"][arg]["Type"]
        name = arg.lower()[:40]
        return f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{name}" if kind == "AWS::SQS::Queue" else name
    if fn == "Fn::GetAtt":
        name = arg[0].lower()[:40]
        if arg[1] != "Arn":
            return name
        if template["Resources"][arg[0]]["Type"] == "AWS::IAM::Role":
            return f"arn:aws:iam::{ACCOUNT}:role/{name}"
        return f"arn:aws:svc:{REGION}:{ACCOUNT}:{name}"
    if fn == "Fn::Select":
        index, (split, (sep, text)) = arg[0], next(iter(arg[1].items()))
        assert split == "Fn::Split"
        return _cfn(text, template).split(sep)[int(index)]
    raise AssertionError(f"no shape for {fn}")


@pytest.mark.parametrize("mode", MODES)
def test_release_values_render_and_validate(stacks: dict[str, Any], mode: str) -> None:
    stack, template = stacks[mode]["stack"], stacks[mode]["template"]
    values = _concrete(stack.cluster.values(stack), stack, template)
    objs = render(values)
    validators = crd_validators()
    for obj in (o for o in objs if is_custom(o)):
        assert not list(validators[(obj["apiVersion"], obj["kind"])].iter_errors(obj)), obj["kind"]
    urls = {so["spec"]["triggers"][0]["metadata"]["queueURL"] for so in of_kind(objs, "ScaledObject")}
    assert len(urls) == len(stack.fleet.queues) and all(u.startswith("https://sqs.") for u in urls)
    (ingress,) = of_kind(objs, "Ingress")
    assert ingress["metadata"]["annotations"]["alb.ingress.kubernetes.io/certificate-arn"].startswith(
        "arn:aws:acm:"
    )
    api = by_name(objs, "Deployment")["fleet-sdfleet-api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["image"].startswith(f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/")
    accounts = by_name(objs, "ServiceAccount")
    annotated = "eks.amazonaws.com/role-arn" in accounts["fleet-sdfleet-worker"]["metadata"].get(
        "annotations", {}
    )
    assert annotated == (mode == "irsa"), "Pod Identity maps the service account by association"


def test_app_context_refuses_an_unknown_identity_mode(tmp_path: Any) -> None:
    from sdfleet.errors import ConfigError

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION", "1")
        mp.setenv("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
        app_module = _load_cdk()
        import aws_cdk as cdk

        context = {"config": str(EXAMPLE), "cluster": "true", "identity": "kiam"}
        with pytest.raises(ConfigError, match="pod-identity or irsa"):
            app_module.build(cdk.App(context=context))
