"""deploy/cdk: the synthesised stack holds exactly what the aws engine names, routes and reads.

One synthesis per variant (module scope): the example fleet with the defaults through
``SdfleetStack``, and a fleet with a MessageBody-scope queue, IRSA and KEDA through ``app.build``
with CDK context, as ``cdk deploy -c ...`` runs it.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdfleet.api.thumbs import SUFFIX as thumbs_suffix
from sdfleet.bus.backends.aws import AwsBus
from sdfleet.bus.backends.aws_topology import queue_name, topic_name
from sdfleet.bus.base import dlq_name
from sdfleet.disjoint import effective_filters
from sdfleet.errors import ConfigError, UrlRefused
from sdfleet.routing import resolve_queues, stamp, task_attributes
from sdfleet.settings import FleetConfig, load_fleet
from sdfleet.storage.backends.s3 import S3BlobStore
from sdfleet.store.backends.dynamodb import INDEXES, TTL_ATTRIBUTE, DynamoTaskStore, table_spec
from sdfleet.tasks import Task, TaskRecord

ROOT = Path(__file__).resolve().parents[2]
CDK_DIR = ROOT / "deploy" / "cdk"
EXAMPLE = ROOT / "examples" / "sdfleet.yaml"
OIDC = "arn:aws:iam::123456789012:oidc-provider/oidc.eks.eu-west-1.amazonaws.com/id/ABCDEF0123"
PREFIX = "cdk1-"  # unlike any other test's, since moto_server is shared by the session
ISSUER = "oidc.eks.eu-west-1.amazonaws.com/id/ABCDEF0123"
PAGER = "arn:aws:sns:eu-west-1:123456789012:ops-pager"
BODY_FLEET = """
queues:
  - name: sdxl
    filter: {task: {model: [{prefix: "sdxl"}]}}
    filter_scope: MessageBody
  - name: rest
results_queue: null
models: {s3: "s3://acme-models/checkpoints"}
retry: {max_receives: 5, lease_s: 90.5}
runtimes: {a1111: {input_s3_buckets: ["acme-controlnet/maps"]}}
"""

# docs/aws.md, "IAM": every action each role holds, and no other.
API_ACTIONS = set(
    "sns:Publish sqs:GetQueueUrl sqs:GetQueueAttributes dynamodb:DescribeTable dynamodb:GetItem "
    "dynamodb:PutItem dynamodb:DeleteItem dynamodb:Query s3:GetObject s3:DeleteObject s3:PutObject "
    "s3:ListBucket".split()
)
AGENT_ACTIONS = set(
    "sqs:GetQueueUrl sqs:GetQueueAttributes sqs:ReceiveMessage sqs:DeleteMessage "
    "sqs:ChangeMessageVisibility sns:Publish dynamodb:DescribeTable dynamodb:GetItem dynamodb:PutItem "
    "s3:PutObject s3:GetObject s3:ListBucket".split()
)

Resources = dict[str, dict[str, Any]]


class Synth:
    """A synthesised template and the fleet it came from, with lookups by engine name."""

    def __init__(self, template: dict[str, Any], fleet: FleetConfig, prefix: str) -> None:
        self.template = template
        self.resources: Resources = template["Resources"]
        self.outputs: dict[str, Any] = template["Outputs"]
        self.fleet = fleet
        self.prefix = prefix

    def of_type(self, kind: str) -> Resources:
        return {k: r for k, r in self.resources.items() if r["Type"] == kind}

    def results_bucket(self) -> tuple[str, dict[str, Any]]:
        """(logical id, resource) of the results bucket (the one that logs to the other)."""
        ((lid, bucket),) = [
            (k, r)
            for k, r in self.of_type("AWS::S3::Bucket").items()
            if "LoggingConfiguration" in r["Properties"]
        ]
        return lid, bucket

    def queue(self, name: str) -> tuple[str, dict[str, Any]]:
        """(logical id, properties) of the SQS queue the engine calls ``queue_name(prefix, name)``."""
        want = queue_name(self.prefix, name)
        (found,) = [
            (k, r["Properties"])
            for k, r in self.of_type("AWS::SQS::Queue").items()
            if r["Properties"]["QueueName"] == want
        ]
        return found

    def queue_arn(self, name: str) -> dict[str, Any]:
        return {"Fn::GetAtt": [self.queue(name)[0], "Arn"]}

    def topic_ref(self, topic: str) -> dict[str, Any]:
        want = topic_name(self.prefix, topic)
        (lid,) = [
            k for k, r in self.of_type("AWS::SNS::Topic").items() if r["Properties"]["TopicName"] == want
        ]
        return {"Ref": lid}

    def role(self, description_start: str) -> dict[str, Any]:
        (props,) = [
            r["Properties"]
            for r in self.of_type("AWS::IAM::Role").values()
            if r["Properties"]["Description"].startswith(description_start)
        ]
        return props

    def grants(self, role: str) -> dict[str, list[Any]]:
        """Action → resources it is allowed on, over the role's inline policy."""
        (policy,) = self.role(f"sdfleet {role} ")["Policies"]
        out: dict[str, list[Any]] = {}
        for st in policy["PolicyDocument"]["Statement"]:
            assert st["Effect"] == "Allow"
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            for a in actions:
                out.setdefault(a, []).extend(resources)
        return out


def _load_cdk() -> Any:
    """Import the app's modules (they live outside the package) once jsii's banners are off."""
    if str(CDK_DIR) not in sys.path:
        sys.path.insert(0, str(CDK_DIR))
    spec = importlib.util.spec_from_file_location("sdfleet_cdk_app", CDK_DIR / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cdk_app() -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION", "1")
        mp.setenv("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
        yield _load_cdk()


@pytest.fixture(scope="module")
def example(cdk_app: Any) -> Synth:
    import aws_cdk as cdk
    from aws_cdk.assertions import Template
    from sdfleet_stack import SdfleetStack

    fleet = load_fleet(EXAMPLE)
    stack = SdfleetStack(
        cdk.App(),
        "sdfleet",
        fleet=fleet,
        prefix=PREFIX,
        bucket_name=None,
        eks_oidc_provider_arn=None,
        namespace="gen",
        cluster_name="gpu",
    )
    return Synth(Template.from_stack(stack).to_json(), fleet, PREFIX)


@pytest.fixture(scope="module")
def body(cdk_app: Any, tmp_path_factory: pytest.TempPathFactory) -> Synth:
    import aws_cdk as cdk
    from aws_cdk.assertions import Template

    path = tmp_path_factory.mktemp("cdk") / "fleet.yaml"
    path.write_text(BODY_FLEET)
    context = {
        "config": str(path),
        "prefix": "t1_",
        "eks_oidc_provider_arn": OIDC,
        "namespace": "ml",
        "release": "prod",
        "keda_operator": "true",
        "storage_prefix": "",
        "bucket": "acme-out",
        "retain_data": "false",
        "results_expire_days": "30",
        "input_buckets": "acme-in, acme-shared/uploads/",
        "alarm_topic_arn": PAGER,
        "queue_wait_alarm_s": "600",
    }
    stack = cdk_app.build(cdk.App(context=context))
    assert stack.stack_name == "t1"
    return Synth(Template.from_stack(stack).to_json(), load_fleet(path), "t1_")


def _queue_names(fleet: FleetConfig) -> list[str]:
    return [q.name for q in fleet.queues] + ([fleet.results_queue] if fleet.results_queue else [])


@pytest.mark.parametrize("variant", ["example", "body"])
def test_resource_counts_and_names_come_from_the_engine(variant: str, request: pytest.FixtureRequest) -> None:
    s: Synth = request.getfixturevalue(variant)
    names = _queue_names(s.fleet)
    queues = s.of_type("AWS::SQS::Queue")
    assert {r["Properties"]["QueueName"] for r in queues.values()} == {
        queue_name(s.prefix, n) for q in names for n in (q, dlq_name(q))
    }
    assert len(queues) == 2 * len(names)
    assert len(s.of_type("AWS::SNS::Subscription")) == len(names)
    assert {r["Properties"]["TopicName"] for r in s.of_type("AWS::SNS::Topic").values()} == {
        topic_name(s.prefix, "tasks"),
        topic_name(s.prefix, "results"),
    }
    assert len(s.of_type("AWS::DynamoDB::Table")) == 1
    assert len(s.of_type("AWS::S3::Bucket")) == 2  # results and their access logs
    assert len(s.of_type("AWS::IAM::Role")) == 3  # api, agent, KEDA operator


@pytest.mark.parametrize("variant", ["example", "body"])
def test_subscriptions_carry_each_filter_policy_as_written(
    variant: str, request: pytest.FixtureRequest
) -> None:
    s: Synth = request.getfixturevalue(variant)
    subs = {
        r["Properties"]["Endpoint"]["Fn::GetAtt"][0]: r["Properties"]
        for r in s.of_type("AWS::SNS::Subscription").values()
    }
    for q, e in zip(s.fleet.queues, effective_filters(s.fleet.queues), strict=True):
        sub = subs[s.queue(q.name)[0]]
        assert sub["Protocol"] == "sqs" and sub["RawMessageDelivery"] is True
        assert sub["TopicArn"] == s.topic_ref(s.fleet.tasks_topic)
        assert sub.get("FilterPolicy") == e.policy, "first-match: earlier queues excluded"
        assert sub.get("FilterPolicyScope") == (e.scope if e.policy is not None else None)
    if s.fleet.results_queue:
        sub = subs[s.queue(s.fleet.results_queue)[0]]
        assert sub["TopicArn"] == s.topic_ref(s.fleet.results_topic) and "FilterPolicy" not in sub
    scopes = {sub.get("FilterPolicyScope") for sub in subs.values()}
    assert ("MessageBody" in scopes) == (variant == "body")


@pytest.mark.parametrize("variant", ["example", "body"])
def test_queues_lease_redrive_encryption_and_delivery_policy(
    variant: str, request: pytest.FixtureRequest
) -> None:
    s: Synth = request.getfixturevalue(variant)
    for q in s.fleet.queues:
        _, props = s.queue(q.name)
        assert props["VisibilityTimeout"] == math.ceil(s.fleet.retry.lease_s)
        assert props["RedrivePolicy"] == {
            "deadLetterTargetArn": s.queue_arn(dlq_name(q.name)),
            "maxReceiveCount": s.fleet.retry.max_receives,
        }
        assert props["SqsManagedSseEnabled"] is True
        assert s.queue(dlq_name(q.name))[1]["MessageRetentionPeriod"] == 14 * 86400
    policies = [r["Properties"] for r in s.of_type("AWS::SQS::QueuePolicy").values()]
    for q in s.fleet.queues:
        lid = s.queue(q.name)[0]
        (doc,) = [p["PolicyDocument"] for p in policies if p["Queues"] == [{"Ref": lid}]]
        (send,) = [st for st in doc["Statement"] if st["Action"] == "sqs:SendMessage"]
        assert send["Principal"] == {"Service": "sns.amazonaws.com"}
        assert send["Condition"] == {"ArnEquals": {"aws:SourceArn": [s.topic_ref(s.fleet.tasks_topic)]}}


def _alarm_on(alarms: list[dict[str, Any]], metric: str, lid: str) -> dict[str, Any]:
    """The one alarm on ``metric`` of the SQS queue with logical id ``lid``."""
    dimension = [{"Name": "QueueName", "Value": {"Fn::GetAtt": [lid, "QueueName"]}}]
    (alarm,) = [a for a in alarms if a["Dimensions"] == dimension and a["MetricName"] == metric]
    assert alarm["Namespace"] == "AWS/SQS"
    assert (alarm["Statistic"], alarm["Period"], alarm["EvaluationPeriods"]) == ("Maximum", 60, 5)
    assert alarm["TreatMissingData"] == "notBreaching", "an empty, idle queue sends no data: OK"
    return alarm


@pytest.mark.parametrize("variant", ["example", "body"])
def test_dead_letters_and_waiting_tasks_raise_alarms(variant: str, request: pytest.FixtureRequest) -> None:
    """One alarm per dead-letter queue on its own depth (the name the engine moves messages to),
    and one per task queue on the age of its oldest message (not the results queue: its reader
    is the client's), each in alarm after 5 minutes; they notify the ``alarm_topic_arn`` topic
    when one is given (the ``body`` variant, which also sets ``queue_wait_alarm_s``)."""
    s: Synth = request.getfixturevalue(variant)
    alarms = [r["Properties"] for r in s.of_type("AWS::CloudWatch::Alarm").values()]
    actions = [PAGER] if variant == "body" else None
    for name in _queue_names(s.fleet):
        dead = _alarm_on(alarms, "ApproximateNumberOfMessagesVisible", s.queue(dlq_name(name))[0])
        assert (dead["ComparisonOperator"], dead["Threshold"]) == ("GreaterThanOrEqualToThreshold", 1)
        assert dead["AlarmName"] == f"{queue_name(s.prefix, dlq_name(name))}-not-empty"
        assert f"sdfleet dlq redrive {name}" in dead["AlarmDescription"]
        assert dead.get("AlarmActions") == actions
    for q in s.fleet.queues:
        waiting = _alarm_on(alarms, "ApproximateAgeOfOldestMessage", s.queue(q.name)[0])
        bound = 600 if variant == "body" else 900
        assert (waiting["ComparisonOperator"], waiting["Threshold"]) == ("GreaterThanThreshold", bound)
        assert waiting["AlarmName"] == f"{queue_name(s.prefix, q.name)}-waiting"
        assert waiting.get("AlarmActions") == actions
    assert len(alarms) == len(_queue_names(s.fleet)) + len(s.fleet.queues), "no alarm on anything else"


@pytest.mark.parametrize(("value", "refused"), [("0", False), ("12x", True), ("-5", True)])
def test_the_waiting_alarms_can_be_left_out_and_a_bad_bound_is_refused(
    cdk_app: Any, tmp_path: Path, value: str, refused: bool
) -> None:
    import aws_cdk as cdk
    from aws_cdk.assertions import Template

    path = tmp_path / "fleet.yaml"
    path.write_text(BODY_FLEET)
    app = cdk.App(context={"config": str(path), "queue_wait_alarm_s": value})
    if refused:
        with pytest.raises(ConfigError, match=f"queue_wait_alarm_s '{value}': a whole number, 0 or more"):
            cdk_app.build(app)
        return
    resources = Template.from_stack(cdk_app.build(app)).to_json()["Resources"].values()
    metrics = [r["Properties"]["MetricName"] for r in resources if r["Type"] == "AWS::CloudWatch::Alarm"]
    assert "ApproximateAgeOfOldestMessage" not in metrics and "ApproximateNumberOfMessagesVisible" in metrics


@pytest.mark.parametrize(
    ("retain", "context", "days"),
    [
        (None, None, None),
        ("7.5", None, 8),
        ("0.25", None, 1),
        ("7.5", "10", 10),
        (None, "3", 3),
        ("7.5", "5", "refused"),
    ],
)
def test_results_expire_with_the_fleets_retention(
    cdk_app: Any, tmp_path: Path, retain: str | None, context: str | None, days: int | str | None
) -> None:
    """Images outlive their records: the lifecycle rule defaults to ``retain_days`` rounded up, and
    a shorter one is refused."""
    import aws_cdk as cdk
    from aws_cdk.assertions import Template

    path = tmp_path / "fleet.yaml"
    path.write_text(BODY_FLEET + (f"retain_days: {retain}\n" if retain else ""))
    app = cdk.App(context={"config": str(path), **({"results_expire_days": context} if context else {})})
    if days == "refused":
        with pytest.raises(
            ConfigError, match=r"results_expire_days 5 is shorter than the fleet's retain_days 7\.5"
        ):
            cdk_app.build(app)
        return
    synth = Synth(Template.from_stack(cdk_app.build(app)).to_json(), load_fleet(path), "sdfleet-")
    _, bucket = synth.results_bucket()
    rules = {r["Id"]: r for r in bucket["Properties"]["LifecycleConfiguration"]["Rules"]}
    assert rules.get("expire-results", {}).get("ExpirationInDays") == days
    if days is not None:
        assert rules["expire-results"]["Prefix"] == "results/", "only the results, under the storage prefix"


def test_table_is_what_the_dynamo_task_store_creates(example: Synth) -> None:
    ((lid, table),) = example.of_type("AWS::DynamoDB::Table").items()
    props = table["Properties"]
    spec = table_spec(f"{PREFIX}tasks")
    for key in ("TableName", "BillingMode", "AttributeDefinitions", "KeySchema", "GlobalSecondaryIndexes"):
        assert props[key] == spec[key], key
    assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    # The attribute the store writes on a finished record under retain_days: DynamoDB deletes it.
    assert props["TimeToLiveSpecification"] == {"Enabled": True, "AttributeName": TTL_ATTRIBUTE}
    assert table["DeletionPolicy"] == "Retain"
    assert example.outputs["StoreUrl"]["Value"]["Fn::Join"][1][:2] == ["aws://?table=", {"Ref": lid}]


def test_bucket_is_private_and_encrypted(example: Synth, body: Synth) -> None:
    _, bucket = example.results_bucket()
    props = bucket["Properties"]
    assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0][
        "ServerSideEncryptionByDefault"
    ] == {"SSEAlgorithm": "AES256"}
    assert all(props["PublicAccessBlockConfiguration"].values())
    _, other = body.results_bucket()
    assert other["Properties"]["BucketName"] == "acme-out" and other["DeletionPolicy"] == "Delete"
    rules = {r["Id"]: r for r in other["Properties"]["LifecycleConfiguration"]["Rules"]}
    assert rules["expire-results"]["ExpirationInDays"] == 30


def test_agent_role_is_least_privilege(example: Synth) -> None:
    s = example
    grants = s.grants("agent")
    fleet_queues = [s.queue_arn(q.name) for q in s.fleet.queues]
    dead_letter_queues = [s.queue_arn(dlq_name(q.name)) for q in s.fleet.queues]
    assert grants["sqs:DeleteMessage"] == fleet_queues
    # their letters are read for tasks left with no outcome and given back, never deleted
    for action in ("sqs:ReceiveMessage", "sqs:ChangeMessageVisibility"):
        assert grants[action] == fleet_queues + dead_letter_queues, action
    assert grants["sns:Publish"] == [s.topic_ref(s.fleet.results_topic)]
    bucket, _ = s.results_bucket()
    objects = {"Fn::Join": ["", [{"Fn::GetAtt": [bucket, "Arn"]}, "/results/*"]]}
    assert grants["s3:PutObject"] == [objects]
    ((table, _),) = s.of_type("AWS::DynamoDB::Table").items()
    assert grants["dynamodb:PutItem"] == [{"Fn::GetAtt": [table, "Arn"]}]
    assert set(grants) == AGENT_ACTIONS
    assert all(r != "*" for resources in grants.values() for r in resources)


def test_api_role_publishes_tasks_and_never_consumes(example: Synth) -> None:
    s = example
    grants = s.grants("api")
    assert grants["sns:Publish"] == [s.topic_ref(s.fleet.tasks_topic)]
    assert set(grants) == API_ACTIONS
    ((table, _),) = s.of_type("AWS::DynamoDB::Table").items()
    indexes = [{"Fn::Join": ["", [{"Fn::GetAtt": [table, "Arn"]}, f"/index/{i}"]]} for i in INDEXES]
    assert grants["dynamodb:Query"] == [{"Fn::GetAtt": [table, "Arn"]}, *indexes]
    # the gallery's thumbnails (made on first view, stored next to the images), and nothing else
    bucket, _ = s.results_bucket()
    thumbs = {"Fn::Join": ["", [{"Fn::GetAtt": [bucket, "Arn"]}, f"/results/*{thumbs_suffix}"]]}
    assert grants["s3:PutObject"] == [thumbs]
    # DELETE /v1/tasks/{id}: the results (never anything outside the storage prefix) and the record
    results = {"Fn::Join": ["", [{"Fn::GetAtt": [bucket, "Arn"]}, "/results/*"]]}
    assert grants["s3:DeleteObject"] == [results]
    assert grants["dynamodb:DeleteItem"] == [{"Fn::GetAtt": [table, "Arn"]}]
    trust = s.role("sdfleet api ")["AssumeRolePolicyDocument"]["Statement"]
    assert trust == [
        {
            "Action": ["sts:AssumeRole", "sts:TagSession"],
            "Effect": "Allow",
            "Principal": {"Service": "pods.eks.amazonaws.com"},
        }
    ]
    assert s.role("sdfleet agent ")["Description"] == "sdfleet agent (gen/sdfleet-worker)"
    roles = {r["Properties"]["Description"].split()[1]: k for k, r in s.of_type("AWS::IAM::Role").items()}
    associations = [r["Properties"] for r in s.of_type("AWS::EKS::PodIdentityAssociation").values()]
    assert sorted(associations, key=lambda a: a["ServiceAccount"]) == [
        {
            "ClusterName": "gpu",
            "Namespace": namespace,
            "ServiceAccount": sa,
            "RoleArn": {"Fn::GetAtt": [roles[role], "Arn"]},
        }
        for role, namespace, sa in (
            ("keda", "keda", "keda-operator"),
            ("api", "gen", "sdfleet-api"),
            ("api", "gen", "sdfleet-ensure"),  # the chart's ensure hook Job (redis engine)
            ("agent", "gen", "sdfleet-worker"),
        )
    ]


def test_irsa_trust_keda_role_and_models_bucket(body: Synth) -> None:
    s = body
    (trust,) = s.role("sdfleet agent ")["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Federated": OIDC}
    assert trust["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert trust["Condition"] == {
        "StringEquals": {
            f"{ISSUER}:sub": "system:serviceaccount:ml:prod-sdfleet-worker",
            f"{ISSUER}:aud": "sts.amazonaws.com",
        }
    }
    (keda_trust,) = s.role("sdfleet keda ")["AssumeRolePolicyDocument"]["Statement"]
    assert (
        keda_trust["Condition"]["StringEquals"][f"{ISSUER}:sub"] == "system:serviceaccount:keda:keda-operator"
    )
    assert s.grants("keda") == {"sqs:GetQueueAttributes": [s.queue_arn(q.name) for q in s.fleet.queues]}
    grants = s.grants("agent")
    assert {
        "Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}, ":s3:::acme-models/checkpoints/*"]]
    } in grants["s3:GetObject"]
    assert "sns:Publish" in grants and not s.fleet.results_queue


def _arn(value: Any) -> str | None:
    """A resource of the template as a string in the ``aws`` partition; None when it names a resource
    of the stack (``Fn::GetAtt``)."""
    if isinstance(value, str):
        return value
    parts = value.get("Fn::Join", ["", []])[1]
    if not parts or any(isinstance(p, dict) and "Fn::GetAtt" in p for p in parts):
        return None
    return "".join("aws" if p == {"Ref": "AWS::Partition"} else p for p in parts)


def test_agents_may_read_exactly_the_input_keys_their_settings_allow(body: Synth) -> None:
    """``s3://`` inputs are read with the agent's role: without a grant every allowed bucket was
    AccessDenied on AWS. The grant is checked by what it allows (IAM's ``*`` over the key), against
    what ``S3Inputs`` itself allows, key by key."""
    from sdfleet.s3_inputs import S3Inputs

    rules = ["acme-in", "acme-shared/uploads/", "acme-controlnet/maps"]  # context + the a1111 option
    allowed = [a for a in map(_arn, body.grants("agent")["s3:GetObject"]) if a is not None]
    inputs = S3Inputs(rules)
    keys = [
        ("acme-in", "a.png"), ("acme-in", "deep/er/a.png"), ("acme-inx", "a.png"),
        ("acme-shared", "uploads/a.png"), ("acme-shared", "uploads-2/a.png"), ("acme-shared", "a.png"),
        ("acme-controlnet", "maps/x.png"), ("acme-controlnet", "maps2/x.png"), ("acme-controlnet", "x.png"),
        ("acme-out", "results/a.png"),
    ]  # fmt: skip
    for bucket, key in keys:
        by_iam = any(fnmatch.fnmatchcase(f"arn:aws:s3:::{bucket}/{key}", a) for a in allowed)
        try:
            inputs.check(f"s3://{bucket}/{key}")
            by_agent = True
        except UrlRefused:
            by_agent = False
        assert by_iam == by_agent, (bucket, key, by_iam, by_agent, allowed)
    assert json.loads(body.outputs["AgentInputBuckets"]["Value"]) == ["acme-in", "acme-shared/uploads/"]


@pytest.mark.parametrize("rule", ["acme-in/*", "Acme_In", "acme-in/up?", "s3://acme-in"])
def test_an_input_bucket_iam_cannot_say_is_refused(cdk_app: Any, tmp_path: Path, rule: str) -> None:
    import aws_cdk as cdk

    path = tmp_path / "fleet.yaml"
    path.write_text(BODY_FLEET)
    with pytest.raises(ConfigError, match="input bucket"):
        cdk_app.build(cdk.App(context={"config": str(path), "input_buckets": rule}))


def test_outputs_feed_the_pods_environment(example: Synth) -> None:
    out = example.outputs
    for q in example.fleet.queues:
        key = "QueueUrl" + q.name[:1].upper() + q.name[1:]
        assert out[key]["Value"] == {"Ref": example.queue(q.name)[0]}
    assert out["TasksTopicArn"]["Value"] == example.topic_ref("tasks")
    bus = out["BusUrl"]["Value"]["Fn::Join"][1]
    assert bus[0] == f"aws://?prefix={PREFIX}&region="
    assert {"ApiRoleArn", "AgentRoleArn", "TableName", "BucketName", "StorageUrl"} <= set(out)


def _deploy_on_moto(s: Synth) -> dict[str, str]:
    """Create the stack in moto's CloudFormation; returns its outputs. moto has no
    ``AWS::SNS::Subscription`` resource, so those are made from the template's properties as
    CloudFormation would; the bootstrap-version check (an SSM parameter) is left out."""
    import boto3

    template = {k: v for k, v in s.template.items() if k not in ("Parameters", "Rules")}
    cfn, sns, sqs = boto3.client("cloudformation"), boto3.client("sns"), boto3.client("sqs")
    cfn.create_stack(StackName="cdk1", TemplateBody=json.dumps(template), Capabilities=["CAPABILITY_IAM"])
    (stack,) = cfn.describe_stacks(StackName="cdk1")["Stacks"]
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    topics = {
        k: sns.create_topic(Name=r["Properties"]["TopicName"])["TopicArn"]
        for k, r in s.of_type("AWS::SNS::Topic").items()
    }  # existing: returns its ARN
    for sub in s.of_type("AWS::SNS::Subscription").values():
        p = sub["Properties"]
        name = s.resources[p["Endpoint"]["Fn::GetAtt"][0]]["Properties"]["QueueName"]
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        attrs = {"RawMessageDelivery": str(p["RawMessageDelivery"]).lower()}
        if "FilterPolicy" in p:
            attrs |= {
                "FilterPolicy": json.dumps(p["FilterPolicy"]),
                "FilterPolicyScope": p["FilterPolicyScope"],
            }
        sns.subscribe(TopicArn=topics[p["TopicArn"]["Ref"]], Protocol="sqs", Endpoint=arn, Attributes=attrs)
    return {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}


async def test_engines_run_on_the_deployed_stack_without_ensure(example: Synth, moto_url: str) -> None:
    """The stack's outputs are the pods' SDFLEET_* URLs: tasks land where ``resolve_queues`` says,
    records and files go to the stack's table and bucket, results reach the results queue."""
    out = _deploy_on_moto(example)
    fleet = example.fleet
    sd15 = "v1-5-pruned-emaonly.safetensors"
    tasks = [
        (Task(model=sd15), "standard"),
        (Task(model="sdxl.safetensors"), "standard"),
        (Task(model=sd15), "paid"),  # sd15 and paid both accept it: SNS delivers it to paid only
        (Task(), "paid"),
    ]
    async with AwsBus.from_url(out["BusUrl"]) as bus:
        expected: dict[str, set[str]] = {q.name: set() for q in fleet.queues}
        for task, tier in tasks:
            attrs = task_attributes(task, tier=tier)
            for q in resolve_queues(fleet, task, attrs):
                expected[q].add(task.id)
            await bus.publish(fleet.tasks_topic, task.to_message(), stamp(attrs))
        assert all(len(resolve_queues(fleet, t, task_attributes(t, tier=tier))) == 1 for t, tier in tasks)
        for q in fleet.queues:
            got = await bus.receive(q.name, max_messages=10, wait_s=1, lease_s=5)
            assert {d.attributes["task_id"] for d in got} == expected[q.name], q.name
        await bus.publish(fleet.results_topic, b'{"event": "succeeded"}', {"task_id": "t1"})
        assert fleet.results_queue is not None
        (result,) = await bus.receive(fleet.results_queue, max_messages=10, wait_s=1, lease_s=5)
        assert result.body == b'{"event": "succeeded"}'
    async with DynamoTaskStore.from_url(out["StoreUrl"]) as store:
        record, created = await store.create(TaskRecord(task=Task(tenant="acme")))
        assert created and (await store.get(record.tenant, record.id)) == record
    async with S3BlobStore.from_url(out["StorageUrl"]) as storage:
        await storage.put("t/1.png", b"png", "image/png")
        assert await storage.get("t/1.png") == b"png"


def _keda_role(s: Synth) -> tuple[str, dict[str, Any]]:
    ((lid, role),) = [
        (k, r)
        for k, r in s.of_type("AWS::IAM::Role").items()
        if r["Properties"]["Description"].startswith("sdfleet keda ")
    ]
    return lid, role["Properties"]


@pytest.mark.parametrize("variant", ["example", "body"])
def test_keda_can_read_every_queue_the_chart_scales_on(variant: str, request: pytest.FixtureRequest) -> None:
    """The default path end to end: the chart's TriggerAuthentication makes KEDA use its own
    identity (keda/keda-operator), the stack maps that service account to a role (Pod Identity
    association, or IRSA trust), and the role may read the attributes of each trigger's queue."""
    from k8s_checks import CLUSTER, merge, of_kind, render

    from sdfleet.deploy import chart_values

    s: Synth = request.getfixturevalue(variant)
    values = chart_values(s.fleet, engine="aws", prefix=s.prefix, region="eu-west-1", account="123456789012")
    objs = render(merge(values, {k: v for k, v in CLUSTER.items() if k != "serviceAccounts"}))
    (auth,) = of_kind(objs, "TriggerAuthentication")
    assert auth["spec"]["podIdentity"] == {"provider": "aws", "identityOwner": "keda"}
    lid, role = _keda_role(s)
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    if variant == "example":  # Pod Identity: an association of KEDA's service account with the role
        assert trust["Principal"] == {"Service": "pods.eks.amazonaws.com"}
        (assoc,) = [
            r["Properties"]
            for r in s.of_type("AWS::EKS::PodIdentityAssociation").values()
            if r["Properties"]["RoleArn"] == {"Fn::GetAtt": [lid, "Arn"]}
        ]
        assert (assoc["Namespace"], assoc["ServiceAccount"]) == ("keda", "keda-operator")
    else:  # IRSA: the web identity of KEDA's service account may assume it
        assert (
            trust["Condition"]["StringEquals"][f"{ISSUER}:sub"] == "system:serviceaccount:keda:keda-operator"
        )
    readable = s.grants("keda")["sqs:GetQueueAttributes"]
    for so in of_kind(objs, "ScaledObject"):
        url = so["spec"]["triggers"][0]["metadata"]["queueURL"]
        assert s.queue_arn(url.rsplit("/", 1)[1][len(s.prefix) :]) in readable, url
