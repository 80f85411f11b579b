"""IAM of the chart's optional ADOT collector (``adot.enabled``): what its configuration calls.

The collector's ``awsxray`` exporter sends segments to X-Ray and asks X-Ray for sampling rules;
its ``awsemf`` exporter writes EMF log events (CloudWatch turns them into metrics) into the log
group ``/aws/sdfleet/<chart fullname>/metrics``, the chart's default ``adot.metrics.logGroup``.
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_eks as eks
from aws_cdk import aws_iam as iam
from constructs import Construct
from sdfleet_iam import Identity, chart_fullname

XRAY_ACTIONS = [
    "xray:PutTraceSegments",
    "xray:PutTelemetryRecords",
    "xray:GetSamplingRules",
    "xray:GetSamplingTargets",
    "xray:GetSamplingStatisticSummaries",
]
EMF_ACTIONS = ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]


def metrics_log_group(release: str) -> str:
    """The chart's default ``adot.metrics.logGroup`` for ``release``."""
    return f"/aws/sdfleet/{chart_fullname(release)}/metrics"


def adot_collector_role(scope: Construct, identity: Identity) -> iam.Role:
    """The role of the collector's service account ``<fullname>-adot``: X-Ray writes and sampling
    (X-Ray has no resource-level permissions), EMF writes to the metrics log group only."""
    namespace, account = identity.namespace, f"{chart_fullname(identity.release)}-adot"
    stack = cdk.Stack.of(scope)
    group = stack.format_arn(
        service="logs",
        resource="log-group",
        resource_name=metrics_log_group(identity.release),
        arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME,
    )
    statements = [
        iam.PolicyStatement(actions=XRAY_ACTIONS, resources=["*"]),
        iam.PolicyStatement(actions=EMF_ACTIONS, resources=[group, f"{group}:log-stream:*"]),
    ]
    role = iam.Role(
        scope,
        "adot-role",
        assumed_by=identity.principal(namespace, account),
        description=f"sdfleet ADOT collector ({namespace}/{account})",
        inline_policies={"sdfleet-adot": iam.PolicyDocument(statements=statements)},
    )
    if identity.oidc_provider_arn is None and identity.cluster_name:
        eks.CfnPodIdentityAssociation(
            scope,
            "adot-pod-identity",
            cluster_name=identity.cluster_name,
            namespace=namespace,
            service_account=account,
            role_arn=role.role_arn,
        )
    return role
