"""IAM of an sdfleet fleet: the statements of docs/aws.md ("IAM") and who may assume the roles.

Roles are trusted by the EKS OIDC provider for the chart's service accounts (IRSA) when its ARN is
given, else by EKS Pod Identity (``pods.eks.amazonaws.com``), with a pod identity association per
role when the cluster name is known.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_eks as eks
from aws_cdk import aws_iam as iam
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from sdfleet.errors import ConfigError
from sdfleet.settings import FleetConfig

Storage = tuple[str, str, str]
"""(bucket ARN, ARN of the objects under the key prefix, key prefix)."""

_OIDC_ARN = re.compile(r"^arn:aws[a-z-]*:iam::[0-9]{12}:oidc-provider/(?P<issuer>[^\s]+)$")
_S3_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?$")
_CHART = "sdfleet"
SERVICE_ACCOUNT_ROLE = {"api": "api", "agent": "worker", "adot": "adot"}
"""sdfleet role → the chart's ``serviceAccounts`` entry."""
ALSO_RUN_AS = {"api": ("ensure",)}
"""Other service accounts of the chart that take a role: the ``ensure`` hook Job's (it exists before
the release's own accounts) reads the Redis token as the API does."""
KEDA_SERVICE_ACCOUNT = ("keda", "keda-operator")
"""Namespace and service account of the KEDA operator as its own chart installs it."""
KARPENTER_SERVICE_ACCOUNT = ("kube-system", "karpenter")
"""Karpenter's controller, as the cluster stack installs its chart."""


def chart_fullname(release: str) -> str:
    """``sdfleet.fullname`` of the chart (no overrides): the release name if it contains the chart's."""
    name = release if _CHART in release else f"{release}-{_CHART}"
    return name[:63].rstrip("-")


def _list_bucket(bucket_arn: str, prefix: str) -> iam.PolicyStatement:
    """``ListBucket`` under the key prefix only, so a missing key reads as 404, not 403."""
    conditions = {"StringLike": {"s3:prefix": [f"{prefix}/*"]}} if prefix else None
    return iam.PolicyStatement(actions=["s3:ListBucket"], resources=[bucket_arn], conditions=conditions)


def _queue_reads(queues: Sequence[sqs.IQueue], dlqs: Sequence[sqs.IQueue]) -> iam.PolicyStatement:
    arns = [q.queue_arn for q in [*queues, *dlqs]]
    return iam.PolicyStatement(actions=["sqs:GetQueueUrl", "sqs:GetQueueAttributes"], resources=arns)


@dataclass(frozen=True)
class AwsEngine:
    """What the ``aws`` engine's roles act on: SNS topics, SQS queues and DLQs, the task table.
    None on the ``redis`` engine (ElastiCache grants its own token's read, ``sdfleet_redis.py``)."""

    tasks_topic: sns.ITopic
    results_topic: sns.ITopic
    queues: Sequence[sqs.IQueue]
    dlqs: Sequence[sqs.IQueue]
    table: tuple[str, ...]
    """The task table's ARN, then its indexes'."""


_RECORDS = ["dynamodb:DescribeTable", "dynamodb:GetItem", "dynamodb:PutItem"]
THUMBNAIL_SUFFIX = ".thumb.jpg"
"""``sdfleet.api.thumbs.SUFFIX``: the only objects the API writes."""


def api_statements(storage: Storage, engine: AwsEngine | None) -> list[iam.PolicyStatement]:
    """The API: publish tasks, read queue depth, read, write and delete task records, read and
    delete results (``DELETE /v1/tasks/{id}``) and write the gallery's thumbnails next to them
    (``sdfleet.api.thumbs``: ``<image>.thumb.jpg``)."""
    bucket_arn, objects_arn, prefix = storage
    thumbnails = objects_arn.removesuffix("*") + "*" + THUMBNAIL_SUFFIX
    reads = [
        iam.PolicyStatement(actions=["s3:GetObject", "s3:DeleteObject"], resources=[objects_arn]),
        iam.PolicyStatement(actions=["s3:PutObject"], resources=[thumbnails]),
        _list_bucket(bucket_arn, prefix),
    ]
    if engine is None:
        return reads
    table_arn, *index_arns = engine.table
    return [
        iam.PolicyStatement(actions=["sns:Publish"], resources=[engine.tasks_topic.topic_arn]),
        _queue_reads(engine.queues, engine.dlqs),
        iam.PolicyStatement(actions=[*_RECORDS, "dynamodb:DeleteItem"], resources=[table_arn]),
        iam.PolicyStatement(actions=["dynamodb:Query"], resources=[table_arn, *index_arns]),
        *reads,
    ]


def _models_statements(fleet: FleetConfig) -> list[iam.PolicyStatement]:
    if not fleet.models.s3:
        return []
    m = _S3_URL.match(fleet.models.s3)
    if m is None:
        raise ConfigError(f"models.s3 {fleet.models.s3!r} is not an s3://bucket[/prefix] URL")
    prefix = (m["prefix"] or "").strip("/")
    bucket_arn = f"arn:{cdk.Aws.PARTITION}:s3:::{m['bucket']}"
    objects = f"{bucket_arn}/{prefix}/*" if prefix else f"{bucket_arn}/*"
    return [
        iam.PolicyStatement(actions=["s3:GetObject"], resources=[objects]),
        _list_bucket(bucket_arn, prefix),
    ]


_INPUT_RULE = re.compile(r"^(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>[^*?]*))?$")


def input_rules(fleet: FleetConfig, agent: Sequence[str]) -> list[str]:
    """Every ``s3://`` input rule the fleet's agents may read by (``bucket`` or ``bucket/prefix``):
    ``agent`` (what the agents get as ``agent.input_s3_buckets``) and each runtime's
    ``input_s3_buckets`` option in the fleet file. ``ConfigError`` for a rule that is no bucket name
    or holds an IAM wildcard."""
    rules = [str(r).strip() for r in agent]
    for name, options in fleet.runtimes.items():
        extra = options.get("input_s3_buckets", [])
        if not isinstance(extra, list):
            raise ConfigError(f"runtimes.{name}.input_s3_buckets: a list of bucket[/prefix]")
        rules += [str(r).strip() for r in extra]
    for rule in rules:
        if not _INPUT_RULE.match(rule):
            raise ConfigError(f"input bucket {rule!r}: a bucket name, or bucket/prefix without * or ?")
    return sorted(set(filter(None, rules)))


def _inputs_statements(rules: Sequence[str]) -> list[iam.PolicyStatement]:
    """Reads of ``s3://`` inputs: the keys that start with the rule's prefix, as ``S3Inputs.check``
    allows them (``bucket/in`` allows ``in/x.png`` and ``in-2/y.png``, as there)."""
    if not rules:
        return []
    resources = []
    for rule in rules:
        bucket, _, prefix = rule.partition("/")
        resources.append(f"arn:{cdk.Aws.PARTITION}:s3:::{bucket}/{prefix}*")
    return [iam.PolicyStatement(actions=["s3:GetObject"], resources=resources)]


def agent_statements(
    storage: Storage, fleet: FleetConfig, engine: AwsEngine | None, inputs: Sequence[str] = ()
) -> list[iam.PolicyStatement]:
    """Agents: consume the fleet's queues, read (never delete) their dead-letter queues, publish
    results, transition records, write results, read ``s3://`` inputs by the rules ``inputs``
    (``input_rules``)."""
    bucket_arn, objects_arn, prefix = storage
    results = [
        iam.PolicyStatement(actions=["s3:PutObject", "s3:GetObject"], resources=[objects_arn]),
        _list_bucket(bucket_arn, prefix),
        *_models_statements(fleet),
        *_inputs_statements(inputs),
    ]
    if engine is None:
        return results
    consume = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"]
    # Letters are read and given back (``agent/dead_letters.py``), never deleted: that is ``sdfleet dlq``'s.
    look = ["sqs:ReceiveMessage", "sqs:ChangeMessageVisibility"]
    return [
        _queue_reads(engine.queues, engine.dlqs),
        iam.PolicyStatement(actions=consume, resources=[q.queue_arn for q in engine.queues]),
        iam.PolicyStatement(actions=look, resources=[q.queue_arn for q in engine.dlqs]),
        iam.PolicyStatement(actions=["sns:Publish"], resources=[engine.results_topic.topic_arn]),
        iam.PolicyStatement(actions=_RECORDS, resources=[engine.table[0]]),
        *results,
    ]


def keda_statements(engine: AwsEngine | None) -> list[iam.PolicyStatement]:
    """KEDA's ``aws-sqs-queue`` scaler reads queue depth (on ``redis`` it reads only the token)."""
    if engine is None:
        return []
    arns = [q.queue_arn for q in engine.queues]
    return [iam.PolicyStatement(actions=["sqs:GetQueueAttributes"], resources=arns)]


@dataclass(frozen=True)
class Identity:
    """Who may assume the roles: IRSA on ``oidc_provider_arn``, else EKS Pod Identity."""

    oidc_provider_arn: str | None
    namespace: str
    release: str
    cluster_name: str | None = None
    oidc_issuer: str | None = None
    """The issuer (``oidc.eks.<region>.amazonaws.com/id/<id>``) when the ARN is a token (a cluster
    made in the same stack); otherwise read from the ARN."""

    def service_account(self, role: str) -> tuple[str, str]:
        """(namespace, name) of the service account that ``role`` (api, agent, keda, karpenter) runs as."""
        if role == "keda":
            return KEDA_SERVICE_ACCOUNT
        if role == "karpenter":
            return KARPENTER_SERVICE_ACCOUNT
        return self.namespace, f"{chart_fullname(self.release)}-{SERVICE_ACCOUNT_ROLE[role]}"

    def also(self, role: str) -> list[str]:
        """The chart's other service accounts (``ALSO_RUN_AS``) in ``role``'s namespace that take it."""
        return [f"{chart_fullname(self.release)}-{name}" for name in ALSO_RUN_AS.get(role, ())]

    def principal(
        self, scope: Construct, namespace: str, service_account: str, also: Sequence[str] = ()
    ) -> iam.IPrincipal:
        if self.oidc_provider_arn is None:
            return iam.SessionTagsPrincipal(iam.ServicePrincipal("pods.eks.amazonaws.com"))
        if cdk.Token.is_unresolved(self.oidc_provider_arn):
            if self.oidc_issuer is None:
                raise ConfigError("an OIDC provider made in this stack needs its issuer too")
            issuer: str = self.oidc_issuer
        else:
            m = _OIDC_ARN.match(self.oidc_provider_arn)
            if m is None:
                raise ConfigError(f"{self.oidc_provider_arn!r} is not an IAM OIDC provider ARN")
            issuer = m["issuer"]
        subjects = [f"system:serviceaccount:{namespace}:{name}" for name in (service_account, *also)]
        claims: Any = {
            f"{issuer}:sub": subjects[0] if len(subjects) == 1 else subjects,
            f"{issuer}:aud": "sts.amazonaws.com",
        }
        if cdk.Token.is_unresolved(issuer):  # condition keys must be plain strings in CloudFormation
            claims = cdk.CfnJson(scope, f"{service_account}-irsa-claims", value=claims)
        conditions = {"StringEquals": claims}
        return iam.FederatedPrincipal(self.oidc_provider_arn, conditions, "sts:AssumeRoleWithWebIdentity")

    def role(self, scope: Construct, role: str, statements: list[iam.PolicyStatement]) -> iam.Role:
        namespace, account = self.service_account(role)
        also = self.also(role)
        r = iam.Role(
            scope,
            f"{role}-role",
            assumed_by=self.principal(scope, namespace, account, also),
            description=f"sdfleet {role} ({namespace}/{account})",
            # IAM refuses an empty policy document (KEDA's role on the redis engine starts empty)
            inline_policies={"sdfleet": iam.PolicyDocument(statements=statements)} if statements else None,
        )
        if self.oidc_provider_arn is None and self.cluster_name:
            for n, name in enumerate([account, *also]):
                eks.CfnPodIdentityAssociation(
                    scope,
                    f"{role}-pod-identity" if n == 0 else f"{role}-pod-identity-{name.rsplit('-', 1)[-1]}",
                    cluster_name=self.cluster_name,
                    namespace=namespace,
                    service_account=name,
                    role_arn=r.role_arn,
                )
        return r
