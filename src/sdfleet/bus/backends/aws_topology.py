"""Names, ``ensure()`` and depth of the AWS bus: SNS topics, SQS queues, DLQs, queue policies,
subscriptions.

Blocking boto3 code, called from ``AwsBus.ensure`` in a worker thread. Importing this module does
not import boto3, so deploy tooling can reuse ``queue_name``/``topic_name`` without the AWS extra.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any

from sdfleet.bus.base import DLQ_RETENTION_S, QueueSpec, QueueStats, Subscription, Topology, dlq_name
from sdfleet.errors import ConfigError, NotFound

if TYPE_CHECKING:
    from mypy_boto3_sns import SNSClient
    from mypy_boto3_sqs import SQSClient

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
_DEPTH: Any = [
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
    "RedrivePolicy",
]


def queue_name(prefix: str, queue: str) -> str:
    """The SQS queue name of ``queue`` (also the SNS topic name of a topic): ``<prefix><queue>``.

    The one naming rule shared with the deploy tooling (KEDA triggers, CDK). Raises
    ``ConfigError`` unless the result is a valid SQS name (1-80 of ``A-Za-z0-9_-``).
    """
    name = f"{prefix}{queue}"
    if not _NAME.match(name):
        raise ConfigError(f"{name!r} is not a valid SQS/SNS name (1-80 characters of A-Za-z0-9_-)")
    return name


def topic_name(prefix: str, topic: str) -> str:
    """The SNS topic name of ``topic`` (same rule as queues)."""
    return queue_name(prefix, topic)


def existing_queue_url(sqs: SQSClient, ref: str) -> str:
    """The URL of an existing queue given by URL or by name; ``NotFound`` naming the queue (the
    other engines' words; SQS's own are ``GetQueueUrl: AWS.SimpleQueueService.NonExistentQueue``)."""
    if ref.startswith(("https://", "http://")):
        return ref
    try:
        return sqs.get_queue_url(QueueName=ref)["QueueUrl"]
    except sqs.exceptions.QueueDoesNotExist as e:
        raise NotFound(f"queue {ref!r} does not exist") from e


def dead_letter_url(sqs: SQSClient, redrive_policy: str | None) -> str | None:
    """The URL of the dead-letter queue a ``RedrivePolicy`` names; None without one (the seed's
    queues have none) or when it is gone."""
    if not redrive_policy:
        return None
    arn = str(json.loads(redrive_policy).get("deadLetterTargetArn", ""))
    try:
        return sqs.get_queue_url(QueueName=arn.rsplit(":", 1)[-1])["QueueUrl"]
    except sqs.exceptions.QueueDoesNotExist:
        return None


def queue_stats(sqs: SQSClient, queue: str, url: str) -> QueueStats:
    """Depth of the queue at ``url`` and of the DLQ its ``RedrivePolicy`` names (none: 0)."""
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=_DEPTH).get("Attributes", {})
    dead = 0
    dlq_url = dead_letter_url(sqs, attrs.get("RedrivePolicy"))
    if dlq_url is not None:
        dlq = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=_DEPTH[:1])
        dead = int(dlq.get("Attributes", {}).get("ApproximateNumberOfMessages", "0"))
    return QueueStats(
        queue=queue,
        visible=int(attrs.get("ApproximateNumberOfMessages", "0")),
        in_flight=int(attrs.get("ApproximateNumberOfMessagesNotVisible", "0")),
        delayed=int(attrs.get("ApproximateNumberOfMessagesDelayed", "0")),
        oldest_age_s=None,
        dead_letters=dead,
        dead_letter_queue=dlq_url is not None,
    )


def queue_policy(queue_arn: str, topic_arns: list[str]) -> str:
    """SQS access policy that lets exactly these SNS topics deliver into the queue."""
    statement = {
        "Sid": "sdfleet-sns-delivery",
        "Effect": "Allow",
        "Principal": {"Service": "sns.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": queue_arn,
        "Condition": {"ArnEquals": {"aws:SourceArn": sorted(topic_arns)}},
    }
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


def _upsert_queue(sqs: SQSClient, name: str, attributes: dict[str, str]) -> str:
    """Create the queue with ``attributes``, or update an existing one (CreateQueue refuses an
    existing name whose attributes differ)."""
    try:
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except sqs.exceptions.QueueDoesNotExist:
        return sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]  # type: ignore[arg-type]
    if attributes:
        sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)  # type: ignore[arg-type]
    return url


def _queue_arn(sqs: SQSClient, url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def _ensure_queue(
    sqs: SQSClient, prefix: str, spec: QueueSpec, topic_arns: list[str]
) -> tuple[str, str, str]:
    """Returns (queue url, queue arn, dlq url)."""
    dlq_url = _upsert_queue(
        sqs, queue_name(prefix, dlq_name(spec.name)), {"MessageRetentionPeriod": str(DLQ_RETENTION_S)}
    )
    redrive = {"deadLetterTargetArn": _queue_arn(sqs, dlq_url), "maxReceiveCount": spec.max_receives}
    attributes = {
        "VisibilityTimeout": str(max(0, min(43200, math.ceil(spec.lease_s)))),
        "MessageRetentionPeriod": str(max(60, min(DLQ_RETENTION_S, math.ceil(spec.retention_s)))),
        "RedrivePolicy": json.dumps(redrive),
    }
    url = _upsert_queue(sqs, queue_name(prefix, spec.name), attributes)
    arn = _queue_arn(sqs, url)
    if topic_arns:
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": queue_policy(arn, topic_arns)})
    return url, arn, dlq_url


def _subscription_attributes(sub: Subscription) -> list[tuple[str, str]]:
    """Attribute updates in a safe order: a nested (body) policy is only valid once the scope is
    ``MessageBody``; a flat policy is valid in both scopes, so it goes first when leaving it."""
    if sub.filter_policy is None:
        return [("RawMessageDelivery", "true"), ("FilterPolicy", "{}")]
    policy = ("FilterPolicy", json.dumps(sub.filter_policy))
    scope = ("FilterPolicyScope", sub.scope)
    ordered = [scope, policy] if sub.scope == "MessageBody" else [policy, scope]
    return [("RawMessageDelivery", "true"), *ordered]


def _find_subscription(sns: SNSClient, topic_arn: str, queue_arn: str) -> str | None:
    for page in sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic_arn):
        for s in page.get("Subscriptions", []):
            if s.get("Protocol") == "sqs" and s.get("Endpoint") == queue_arn:
                return s.get("SubscriptionArn")
    return None


def _ensure_subscription(sns: SNSClient, topic_arn: str, queue_arn: str, sub: Subscription) -> None:
    existing = _find_subscription(sns, topic_arn, queue_arn)
    if existing is None or existing == "PendingConfirmation":
        attributes: dict[str, Any] = dict(_subscription_attributes(sub))
        if sub.filter_policy is None:
            attributes.pop("FilterPolicy")
        sns.subscribe(
            TopicArn=topic_arn,
            Protocol="sqs",
            Endpoint=queue_arn,
            Attributes=attributes,
            ReturnSubscriptionArn=True,
        )
        return
    current = sns.get_subscription_attributes(SubscriptionArn=existing).get("Attributes", {})
    for name, value in _subscription_attributes(sub):
        if current.get(name, "") != value:
            sns.set_subscription_attributes(
                SubscriptionArn=existing, AttributeName=name, AttributeValue=value
            )


def ensure_topology(
    sns: SNSClient, sqs: SQSClient, prefix: str, topology: Topology
) -> tuple[dict[str, str], dict[str, str]]:
    """Create or update everything in ``topology``; returns (topic → ARN, queue → URL)."""
    topics: dict[str, str] = {}
    for t in [*topology.topics, *(s.topic for s in topology.subscriptions)]:
        if t.startswith("arn:"):  # an existing topic (e.g. a seed deployment's), used as is
            topics[t] = t
        elif t not in topics:
            topics[t] = sns.create_topic(Name=topic_name(prefix, t))["TopicArn"]
    urls: dict[str, str] = {}
    arns: dict[str, str] = {}
    specs = {q.name: q for q in topology.queues}
    for s in topology.subscriptions:
        specs.setdefault(s.queue, QueueSpec(name=s.queue))
    for name, spec in specs.items():
        senders = sorted({topics[s.topic] for s in topology.subscriptions if s.queue == name})
        urls[name], arns[name], urls[dlq_name(name)] = _ensure_queue(sqs, prefix, spec, senders)
    for s in topology.subscriptions:
        _ensure_subscription(sns, topics[s.topic], arns[s.queue], s)
    return topics, urls
