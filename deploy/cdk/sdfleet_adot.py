"""IAM of the chart's optional ADOT collector (``adot.enabled``): what its configuration calls.

The collector's ``awsxray`` exporter sends segments to X-Ray and asks X-Ray for sampling rules;
its ``awsemf`` exporter writes EMF log events (CloudWatch turns them into metrics) into the log
group ``/aws/sdfleet/<chart fullname>/metrics``, the chart's default ``adot.metrics.logGroup``.
"""

from __future__ import annotations

import aws_cdk as cdk
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
    group = cdk.Stack.of(scope).format_arn(
        service="logs",
        resource="log-group",
        resource_name=metrics_log_group(identity.release),
        arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME,
    )
    statements = [
        iam.PolicyStatement(actions=XRAY_ACTIONS, resources=["*"]),
        iam.PolicyStatement(actions=EMF_ACTIONS, resources=[group, f"{group}:log-stream:*"]),
    ]
    return identity.role(scope, "adot", statements)
