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

from sdfleet.settings import Settings, load_fleet

MODES = ("pod-identity", "irsa")
KEYS = ("default", "paid")
INPUTS = ("acme-in", "acme-shared/up")  # a prefix: keys that start with "up"
ALL = (*MODES, "redis")  # redis: the pod-identity cluster on ElastiCache, no API Gateway
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
        from sdfleet_apigw import ApiGatewayOptions
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
                api_gateway=ApiGatewayOptions(rate_limit=50, burst_limit=80, quota_per_day=10000, keys=KEYS),
            )
            stack = SdfleetStack(
                app, f"sd-{mode}", fleet=load_fleet(EXAMPLE), cluster=options, env=env, input_buckets=INPUTS
            )
            out[mode] = {"stack": stack}
        options = ClusterOptions(engine="redis")
        out["redis"] = {
            "stack": SdfleetStack(app, "sd-redis", fleet=load_fleet(EXAMPLE), cluster=options, env=env)
        }
        cdk.Aspects.of(app).add(AwsSolutionsChecks())
        for mode in ALL:
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


@pytest.mark.parametrize("mode", ALL)
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
        # the API's role is also the ensure hook's (its own account, made before the release's)
        identity = stacks[mode]["stack"].identity
        trust = t["Resources"][_role_of(t, "sdfleet api ")]["Properties"]["AssumeRolePolicyDocument"]
        (claims_id, _) = trust["Statement"][0]["Condition"]["StringEquals"]["Fn::GetAtt"]  # a CfnJson
        claims = json.dumps(t["Resources"][claims_id]["Properties"]["Value"])
        for account in ("sdfleet-api", "sdfleet-ensure"):  # the chart's fullname is the release's
            assert (
                identity.release == "sdfleet"
                and f"system:serviceaccount:{identity.namespace}:{account}" in claims
            )
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


_PSEUDO = {
    "AWS::Region": REGION,
    "AWS::AccountId": ACCOUNT,
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
}
_REF_SHAPES = {  # what Ref gives for these resource types, by their logical id's lowercase name
    "AWS::SQS::Queue": f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{{name}}",
    "AWS::SecretsManager::Secret": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{{name}}-AbCdEf",
    "AWS::ElasticLoadBalancingV2::TargetGroup": (
        f"arn:aws:elasticloadbalancing:{REGION}:{ACCOUNT}:targetgroup/{{name}}/0123456789abcdef"
    ),
}


def _cfn(node: Any, template: dict[str, Any]) -> str:
    if isinstance(node, str):
        return node
    ((fn, arg),) = node.items()
    if fn == "Fn::Join":
        return str(arg[0]).join(_cfn(p, template) for p in arg[1])
    if fn == "Ref":
        if arg in _PSEUDO:
            return _PSEUDO[arg]
        shape = _REF_SHAPES.get(template["Resources"][arg]["Type"], "{name}")
        return shape.format(name=arg.lower()[:32])
    if fn == "Fn::GetAtt":
        return _attribute(arg[0], arg[1], template)
    if fn == "Fn::Select":
        index, (split, (sep, text)) = arg[0], next(iter(arg[1].items()))
        assert split == "Fn::Split"
        return _cfn(text, template).split(sep)[int(index)]
    raise AssertionError(f"no shape for {fn}")


def _attribute(resource: str, attribute: str, template: dict[str, Any]) -> str:
    name = resource.lower()[:40]
    if attribute.endswith("EndPoint.Port"):
        return "6380"
    if attribute.endswith("EndPoint.Address"):
        return f"master.{name[:20]}.abc123.euw1.cache.amazonaws.com"
    if attribute != "Arn":
        return name
    if template["Resources"][resource]["Type"] == "AWS::IAM::Role":
        return f"arn:aws:iam::{ACCOUNT}:role/{name}"
    return f"arn:aws:svc:{REGION}:{ACCOUNT}:{name}"


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
    (binding,) = of_kind(objs, "TargetGroupBinding")  # API Gateway → VPC link → NLB → these pods
    service = by_name(objs, "Service")[binding["spec"]["serviceRef"]["name"]]
    assert binding["spec"]["serviceRef"]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert binding["spec"]["targetType"] == "ip"
    assert binding["spec"]["targetGroupARN"].startswith("arn:aws:elasticloadbalancing:")
    port = {p["name"]: p["containerPort"] for p in api["ports"]}[service["spec"]["ports"][0]["targetPort"]]
    (group,) = _of_type(template, "AWS::ElasticLoadBalancingV2::TargetGroup").values()
    assert group["Properties"]["Port"] == port, "the NLB targets the API container's port"
    accounts = by_name(objs, "ServiceAccount")
    annotated = "eks.amazonaws.com/role-arn" in accounts["fleet-sdfleet-worker"]["metadata"].get(
        "annotations", {}
    )
    assert annotated == (mode == "irsa"), "Pod Identity maps the service account by association"
    # the agents get the input buckets their role may read, in the form their settings parse
    workers = [d for n, d in by_name(objs, "Deployment").items() if n != "fleet-sdfleet-api"]
    assert workers
    for worker in workers:
        agent = next(c for c in worker["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")
        env = {e["name"]: e.get("value") for e in agent["env"]}
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SDFLEET_AGENT__INPUT_S3_BUCKETS", env["SDFLEET_AGENT__INPUT_S3_BUCKETS"])
            assert Settings().agent.input_s3_buckets == sorted(INPUTS)


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


@pytest.mark.parametrize("mode", MODES)
def test_api_gateway_fronts_the_api_with_keys_a_usage_plan_and_waf(stacks: dict[str, Any], mode: str) -> None:
    t = stacks[mode]["template"]
    (api,) = _of_type(t, "AWS::ApiGateway::RestApi")
    methods = [m["Properties"] for m in _of_type(t, "AWS::ApiGateway::Method").values()]
    assert {m["HttpMethod"] for m in methods} == {"ANY"} and len(methods) == 2, "/ and /{proxy+}"
    assert all(m["ApiKeyRequired"] is True for m in methods), "no method without an API key"
    (nlb_id,) = _of_type(t, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    nlb = t["Resources"][nlb_id]["Properties"]
    assert nlb["Type"] == "network" and nlb["Scheme"] == "internal"
    attributes = {a["Key"]: a["Value"] for a in nlb["LoadBalancerAttributes"]}
    assert attributes["access_logs.s3.enabled"] == "true"
    (link,) = _of_type(t, "AWS::ApiGateway::VpcLink").values()
    assert link["Properties"]["TargetArns"] == [{"Ref": nlb_id}]
    for m in methods:
        integration = m["Integration"]
        assert (integration["Type"], integration["ConnectionType"]) == ("HTTP_PROXY", "VPC_LINK")
        assert {"Fn::GetAtt": [nlb_id, "DNSName"]} in integration["Uri"]["Fn::Join"][1]
    proxy = next(m for m in methods if m.get("RequestParameters"))
    assert proxy["Integration"]["RequestParameters"] == {
        "integration.request.path.proxy": "method.request.path.proxy"
    }
    (plan,) = _of_type(t, "AWS::ApiGateway::UsagePlan").values()
    p = plan["Properties"]
    assert p["Throttle"] == {"RateLimit": 50, "BurstLimit": 80} and p["Quota"] == {
        "Limit": 10000,
        "Period": "DAY",
    }
    assert p["ApiStages"][0]["ApiId"] == {"Ref": api} and p["ApiStages"][0]["Stage"] == {"Ref": _stage_of(t)}
    assert (
        len(_of_type(t, "AWS::ApiGateway::ApiKey"))
        == len(KEYS)
        == len(_of_type(t, "AWS::ApiGateway::UsagePlanKey"))
    )
    (acl_id,) = _of_type(t, "AWS::WAFv2::WebACL")
    rules = {r["Name"]: r for r in t["Resources"][acl_id]["Properties"]["Rules"]}
    assert set(rules) == {"AWSManagedRulesCommonRuleSet", "AWSManagedRulesKnownBadInputsRuleSet"}
    overrides = rules["AWSManagedRulesCommonRuleSet"]["Statement"]["ManagedRuleGroupStatement"][
        "RuleActionOverrides"
    ]
    assert [o["Name"] for o in overrides] == ["SizeRestrictions_BODY"], "img2img bodies exceed 8 KB"
    (association,) = _of_type(t, "AWS::WAFv2::WebACLAssociation").values()
    assert association["Properties"]["WebACLArn"] == {"Fn::GetAtt": [acl_id, "Arn"]}
    (group,) = _of_type(t, "AWS::ElasticLoadBalancingV2::TargetGroup").values()
    g = group["Properties"]
    assert (g["TargetType"], g["Protocol"], g["HealthCheckPath"]) == ("ip", "TCP", "/healthz")
    ingress = [
        r["Properties"]
        for r in _of_type(t, "AWS::EC2::SecurityGroupIngress").values()
        if r["Properties"].get("FromPort") == g["Port"] and "CidrIp" in r["Properties"]
    ]
    assert len(ingress) == 1, "the nodes admit the NLB's VPC addresses on the API port only"
    assert "ApiGatewayUrl" in t["Outputs"] and {f"ApiKeyId{k.title()}" for k in KEYS} <= set(t["Outputs"])


def _stage_of(template: dict[str, Any]) -> str:
    (stage,) = _of_type(template, "AWS::ApiGateway::Stage")
    return stage


def test_api_gateway_needs_the_cluster() -> None:
    from sdfleet.errors import ConfigError

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION", "1")
        mp.setenv("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
        app_module = _load_cdk()
        import aws_cdk as cdk

        with pytest.raises(ConfigError, match="needs the cluster"):
            app_module.build(cdk.App(context={"config": str(EXAMPLE), "api_gateway": "true"}))
        with pytest.raises(ConfigError, match="numbers"):
            context = {
                "config": str(EXAMPLE),
                "cluster": "true",
                "api_gateway": "true",
                "api_rate_limit": "fast",
            }
            app_module.build(cdk.App(context=context))


def test_redis_engine_runs_on_elasticache_with_the_token_in_secrets_manager(stacks: dict[str, Any]) -> None:
    stack, t = stacks["redis"]["stack"], stacks["redis"]["template"]
    (group,) = _of_type(t, "AWS::ElastiCache::ReplicationGroup").values()
    g = group["Properties"]
    assert (g["Engine"], g["Port"], g["NumCacheClusters"]) == ("valkey", 6380, 2)
    assert g["TransitEncryptionEnabled"] and g["TransitEncryptionMode"] == "required"
    assert g["AtRestEncryptionEnabled"] and g["MultiAZEnabled"] and g["AutomaticFailoverEnabled"]
    (secret,) = _of_type(t, "AWS::SecretsManager::Secret")
    token = json.dumps(g["AuthToken"])
    assert "{{resolve:secretsmanager:" in token and secret in token, "a dynamic reference, not a value"
    (parameters,) = _of_type(t, "AWS::ElastiCache::ParameterGroup").values()
    assert parameters["Properties"]["Properties"] == {"maxmemory-policy": "noeviction"}
    (sg,) = [k for k, r in _of_type(t, "AWS::EC2::SecurityGroup").items() if "Redis" in json.dumps(r)]
    rules = [r["Properties"] for r in _of_type(t, "AWS::EC2::SecurityGroupIngress").values()
             if r["Properties"]["GroupId"] == {"Fn::GetAtt": [sg, "GroupId"]}]  # fmt: skip
    assert len(rules) == 1 and rules[0]["FromPort"] == 6380 and "SourceSecurityGroupId" in rules[0]
    readers = set()
    for policy in _of_type(t, "AWS::IAM::Policy").values():
        for st in policy["Properties"]["PolicyDocument"]["Statement"]:
            if "secretsmanager:GetSecretValue" in st["Action"] and st["Resource"] == {"Ref": secret}:
                readers |= {r["Ref"] for r in policy["Properties"]["Roles"]}
    assert readers == {_role_of(t, f"sdfleet {role} ") for role in ("api", "agent", "keda")}
    # ElastiCache carries the bus and the store: no topic, task queue or table, and no role may
    # touch SNS, SQS (but Karpenter, on its interruption queue) or DynamoDB.
    assert not _of_type(t, "AWS::SNS::Topic") and not _of_type(t, "AWS::SNS::Subscription")
    assert not _of_type(t, "AWS::DynamoDB::Table")
    assert [k for k in _of_type(t, "AWS::SQS::Queue")] == [
        k for k in _of_type(t, "AWS::SQS::Queue") if "interruption" in k
    ]
    karpenter = _role_of(t, "sdfleet karpenter ")
    for lid, role in _of_type(t, "AWS::IAM::Role").items():
        if lid == karpenter:
            continue
        docs = [pol["PolicyDocument"] for pol in role["Properties"].get("Policies", [])]
        actions = json.dumps([st["Action"] for d in docs for st in d["Statement"]])
        assert not re.search(r'"(sns|sqs|dynamodb):', actions), (lid, actions)
    outputs = {k: json.dumps(v["Value"]) for k, v in t["Outputs"].items()}
    assert "TableName" not in outputs and not any(k.startswith("QueueUrl") for k in outputs)
    assert "rediss://" in outputs["BusUrl"] and outputs["StoreUrl"] == outputs["BusUrl"]

    values = _concrete(stack.cluster.values(stack), stack, t)
    objs = render(values)
    validators = crd_validators()
    for obj in (o for o in objs if is_custom(o)):
        assert not list(validators[(obj["apiVersion"], obj["kind"])].iter_errors(obj)), obj["kind"]
    (auth,) = of_kind(objs, "TriggerAuthentication")
    (ref,) = auth["spec"]["awsSecretManager"]["secrets"]
    assert ref["parameter"] == "password" and ref["name"].startswith("arn:aws:secretsmanager:")
    for so in of_kind(objs, "ScaledObject"):
        streams = next(tr for tr in so["spec"]["triggers"] if tr["type"] == "redis-streams")
        assert streams["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert streams["metadata"]["enableTLS"] == "true" and streams["metadata"]["address"].endswith(":6380")
    # The ensure hook runs before the release's own accounts exist, as its own hook account that
    # holds the API's role, which may read the Redis token (readers above).
    installed = render(values, release=stack.identity.release, namespace=stack.identity.namespace)
    (job,) = of_kind(installed, "Job")
    account = job["spec"]["template"]["spec"]["serviceAccountName"]
    (sa,) = [o for o in of_kind(installed, "ServiceAccount") if o["metadata"]["name"] == account]
    hooks = [o["metadata"]["annotations"] for o in (sa, job)]
    assert all("pre-install" in a["helm.sh/hook"] for a in hooks)
    assert int(hooks[0]["helm.sh/hook-weight"]) < int(hooks[1]["helm.sh/hook-weight"]), "the account first"
    associations = [r["Properties"] for r in _of_type(t, "AWS::EKS::PodIdentityAssociation").values()]
    (ensure,) = [a for a in associations if a["ServiceAccount"] == account]
    assert ensure["RoleArn"] == {"Fn::GetAtt": [_role_of(t, "sdfleet api "), "Arn"]}
    assert ensure["Namespace"] == stack.identity.namespace
    # What the pods get is a URL sdfleet's Redis client takes: TLS, the secret's ARN, no password.
    from sdfleet._redis import connect
    from sdfleet.settings import Settings

    url = values["urls"]["bus"]
    assert url.startswith("rediss://") and ":@" not in url and Settings(bus_url=url).bus_url == url
    client, prefix = connect(url)
    try:
        provider = client.connection_pool.connection_kwargs["credential_provider"]
        assert provider.secret_id == ref["name"] and prefix == "sdfleet"
        assert client.connection_pool.connection_kwargs["port"] == 6380
    finally:
        client.connection_pool.reset()
