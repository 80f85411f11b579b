"""The bus on AWS: SNS topics fanning out to SQS queues, filtered by SNS itself.

URL: ``aws://[?prefix=sdfleet-][&region=us-east-1][&account=123456789012][&retries=3]``
``[&queue.<name>=<existing SQS queue URL or name>]``

- ``prefix`` is prepended to every topic and queue name (``queue_name()``), so several fleets
  share one account; default ``sdfleet-``.
- ``region`` overrides the AWS chain's region (``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / config).
- ``account`` skips the one ``sts:GetCallerIdentity`` call that builds topic ARNs for ``publish``;
- ``retries``: attempts per call (botocore "standard" mode, backs off on throttling), default 3.
- ``queue.<name>`` attaches the fleet's queue ``<name>`` to an existing SQS queue, e.g. a seed
  deployment's input queue, so an agent drains it in place: ``ensure()`` neither creates,
  changes nor subscribes it; only receive/ack/extend/release/stats use it.
- endpoint and credentials come from the standard chain (``AWS_ENDPOINT_URL`` for moto or
  LocalStack, IRSA on EKS, instance roles, ``AWS_PROFILE``).

Topology: topic ``<prefix><topic>``; queue ``<prefix><queue>`` with ``VisibilityTimeout`` =
``lease_s`` and a ``RedrivePolicy`` to ``<prefix><queue>-dlq`` after ``max_receives``; an SQS queue
policy lets the subscribed topics send; subscriptions use ``RawMessageDelivery`` and pass the
filter policy and its scope to SNS as written. Subscriptions no longer in the topology are left
alone (removing them is a deploy decision). A topic given as an ARN is an existing topic, used as is.

AWS limits that show through (non-empty UTF-8 bodies, at most 10 non-empty attributes, whole
seconds for leases and waits): docs/aws.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sdfleet._aws import AwsContext, error_code, int_param, map_errors, parse_aws_url
from sdfleet.bus.backends.aws_topology import ensure_topology, existing_queue_url, queue_name, queue_stats
from sdfleet.bus.base import NUMBER_ATTRIBUTES, Delivery, QueueStats, Topology, typed_attributes
from sdfleet.bus.batcher import Batcher
from sdfleet.errors import BusError, BusUnavailable, PayloadTooLarge, ValidationFailed

if TYPE_CHECKING:
    from mypy_boto3_sns import SNSClient
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_sqs.type_defs import DeleteMessageBatchRequestEntryTypeDef, MessageTypeDef

log = logging.getLogger(__name__)

MAX_ATTRIBUTES = 10
MAX_WAIT_S = 20
SNS_MAX_BYTES = 256 * 1024
"""SNS ``Publish``: message body and attributes (names, types, values) together."""
_SHORT_POLL_S = 0.1
ACK_LINGER_S = 0.02
"""How long an ack waits for others to share its DeleteMessageBatch call (not on the GPU's path:
the finish stage acks after recording and notifying)."""
_STALE_RECEIPT = frozenset({"ReceiptHandleIsInvalid", "InvalidParameterValue", "MessageNotInflight"})


def _seconds(s: float, upper: int) -> int:
    return max(0, min(upper, math.ceil(s - 1e-9)))


def _message_attributes(attributes: Mapping[str, str]) -> dict[str, Any]:
    if len(attributes) > MAX_ATTRIBUTES:
        raise ValidationFailed(f"at most {MAX_ATTRIBUTES} message attributes on AWS, got {len(attributes)}")
    for k, v in attributes.items():
        if not v:
            raise ValidationFailed(f"message attribute {k!r} is empty; SNS refuses empty values")
    typed_attributes(attributes)  # refuses what SNS would, with the other engines' reason
    return {
        k: {"DataType": "Number" if k in NUMBER_ATTRIBUTES else "String", "StringValue": v}
        for k, v in attributes.items()
    }


class AwsBus:
    """``Bus`` on SNS + SQS. Build with ``AwsBus.from_url("aws://?prefix=sdfleet-")``."""

    def __init__(
        self,
        prefix: str = "sdfleet-",
        *,
        region: str | None = None,
        account: str | None = None,
        max_attempts: int = 3,
        attach: Mapping[str, str] | None = None,
    ) -> None:
        self.prefix = prefix
        self.attached = dict(attach or {})
        """Fleet queue name → existing SQS queue (URL or name) that sdfleet leaves alone."""
        self._aws = AwsContext(region, max_attempts=max_attempts)
        self._account = account
        self._topic_arns: dict[str, str] = {}
        self._queue_urls: dict[str, str] = {}
        self._lease: dict[str, float] = {}
        self._acks = Batcher(self._delete_batch, size=10, linger_s=ACK_LINGER_S)

    @classmethod
    def from_url(cls, url: str) -> AwsBus:
        _, _, q = parse_aws_url(url, "aws")
        attempts = int_param(q, "retries", 3)
        return cls(
            q.get("prefix", "sdfleet-"),
            region=q.get("region"),
            account=q.get("account"),
            max_attempts=attempts,
            attach={k[6:]: v for k, v in q.items() if k.startswith("queue.") and v},
        )

    @property
    def _sns(self) -> SNSClient:
        client: SNSClient = self._aws.client("sns")
        return client

    @property
    def _sqs(self) -> SQSClient:
        client: SQSClient = self._aws.client("sqs")
        return client

    async def ensure(self, topology: Topology) -> None:
        """Create or update topics, queues, DLQs, queue policies and subscriptions."""
        own = topology.model_copy(
            update={
                "queues": [q for q in topology.queues if q.name not in self.attached],
                "subscriptions": [s for s in topology.subscriptions if s.queue not in self.attached],
            }
        )
        with map_errors(BusUnavailable, BusError):
            topics, queues = await self._aws.run(
                lambda: ensure_topology(self._sns, self._sqs, self.prefix, own)
            )
            await self._aws.run(lambda: [self._queue_url(q) for q in self.attached])
        self._topic_arns.update(topics)
        self._queue_urls.update(queues)
        self._lease.update({q.name: q.lease_s for q in topology.queues})

    def _topic_arn(self, topic: str) -> str:
        if topic.startswith("arn:"):
            return topic
        if topic not in self._topic_arns:
            if self._account is None:
                ident = self._aws.client("sts").get_caller_identity()
                self._account = str(ident["Account"])
            region = self._sns.meta.region_name
            partition = self._sns.meta.partition
            name = queue_name(self.prefix, topic)
            self._topic_arns[topic] = f"arn:{partition}:sns:{region}:{self._account}:{name}"
        return self._topic_arns[topic]

    def _queue_url(self, queue: str) -> str:
        if queue not in self._queue_urls:
            ref = self.attached.get(queue) or queue_name(self.prefix, queue)
            self._queue_urls[queue] = existing_queue_url(self._sqs, ref)
        return self._queue_urls[queue]

    async def publish(self, topic: str, body: bytes, attributes: Mapping[str, str]) -> str:
        """SNS ``Publish``; returns SNS's message id. Raises ``NotFound`` for an unknown topic."""
        try:
            message = body.decode()
        except UnicodeDecodeError as e:
            raise ValidationFailed("message bodies must be UTF-8 on AWS") from e
        if not message:
            raise ValidationFailed("SNS refuses empty message bodies")
        attrs = _message_attributes(attributes)
        size = len(body) + sum(len(f"{k}String{v}".encode()) for k, v in attributes.items())
        if size > SNS_MAX_BYTES:
            # SNS's own answer is "InvalidParameter: ... Message too long", naming no limit
            raise PayloadTooLarge(
                f"the task is {size / 1024:.0f} KiB as a message and the aws engine (SNS) takes at most "
                f"{SNS_MAX_BYTES // 1024} KiB: send input images as http(s) or s3:// URLs, not inline"
            )

        def call() -> str:
            arn = self._topic_arn(topic)
            return self._sns.publish(TopicArn=arn, Message=message, MessageAttributes=attrs)["MessageId"]

        with map_errors(BusUnavailable, BusError):
            return await self._aws.run(call)

    async def receive(
        self,
        queue: str,
        *,
        max_messages: int = 1,
        wait_s: float = 0.0,
        lease_s: float | None = None,
        until: asyncio.Event | None = None,
    ) -> list[Delivery]:
        """``ReceiveMessage`` (long polls of at most 20 s until ``wait_s`` has passed or ``until``
        is set; a poll is never cut short: SQS may have leased messages for it)."""
        lease = lease_s if lease_s is not None else self._lease.get(queue)
        deadline = time.monotonic() + max(0.0, wait_s)
        with map_errors(BusUnavailable, BusError):
            url = await self._aws.run(lambda: self._queue_url(queue))
            while True:
                remaining = deadline - time.monotonic()
                poll = max(0, min(MAX_WAIT_S, int(remaining + 0.5)))  # SQS waits whole seconds
                messages = await self._receive_once(url, max_messages, poll, lease)
                if messages:
                    return [self._delivery(queue, m) for m in messages]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (until is not None and until.is_set()):
                    return []
                if poll == 0:
                    await asyncio.sleep(min(remaining, _SHORT_POLL_S))

    async def _receive_once(
        self, url: str, max_messages: int, poll: int, lease: float | None
    ) -> list[MessageTypeDef]:
        kwargs: dict[str, Any] = {
            "QueueUrl": url,
            "MaxNumberOfMessages": max(1, min(10, max_messages)),
            "WaitTimeSeconds": poll,
            "AttributeNames": ["All"],
            "MessageAttributeNames": ["All"],
        }
        if lease is not None:
            kwargs["VisibilityTimeout"] = _seconds(lease, 43200)
        future: Future[list[MessageTypeDef]] = self._aws.submit(
            lambda: self._sqs.receive_message(**kwargs).get("Messages", [])
        )
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # a cancelled long poll may still return messages: hand them back instead of hiding
            # them for a whole lease
            future.add_done_callback(lambda f: self._release_orphans(url, f))
            raise

    def _release_orphans(self, url: str, future: Future[list[MessageTypeDef]]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        entries = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
            for i, m in enumerate(future.result())
        ]
        if entries:
            try:
                self._sqs.change_message_visibility_batch(QueueUrl=url, Entries=entries)  # type: ignore[arg-type]
            except Exception:  # the messages come back after their lease anyway
                log.warning(
                    "could not release %d messages of a cancelled receive", len(entries), exc_info=True
                )

    @staticmethod
    def _delivery(queue: str, m: MessageTypeDef) -> Delivery:
        sys_attrs = m.get("Attributes", {})
        attrs = {k: v.get("StringValue", "") for k, v in m.get("MessageAttributes", {}).items()}
        return Delivery(
            queue=queue,
            message_id=m["MessageId"],
            body=m.get("Body", "").encode(),
            attributes=attrs,
            receive_count=int(sys_attrs.get("ApproximateReceiveCount", "1")),
            receipt=m["ReceiptHandle"],
            sent_at=int(sys_attrs.get("SentTimestamp", "0")) / 1000.0,
            raw=dict(m),
        )

    async def ack(self, d: Delivery) -> None:
        """``DeleteMessageBatch`` of the acks made within ``ACK_LINGER_S`` of each other on one queue
        (at most 10 a call); a stale receipt handle (lease expired, already deleted) is ignored."""
        await self._acks.add(d)

    async def extend(self, d: Delivery, lease_s: float) -> None:
        """``ChangeMessageVisibility`` to ``lease_s`` (rounded up to whole seconds) from now.

        A stale receipt handle (the lease expired, the message went to another receiver) is
        ignored, as for ``ack``: the other receiver now owns the message."""
        await self._change(d, _seconds(lease_s, 43200))

    async def release(self, d: Delivery, delay_s: float = 0.0) -> None:
        """``ChangeMessageVisibility`` to ``delay_s``; a stale receipt handle is ignored."""
        await self._change(d, _seconds(delay_s, 43200))

    async def _change(self, d: Delivery, visibility: int | None) -> None:
        def call() -> None:
            url = self._queue_url(d.queue)
            try:
                if visibility is None:
                    self._sqs.delete_message(QueueUrl=url, ReceiptHandle=d.receipt)
                else:
                    self._sqs.change_message_visibility(
                        QueueUrl=url, ReceiptHandle=d.receipt, VisibilityTimeout=visibility
                    )
            except ClientError as e:
                if error_code(e) not in _STALE_RECEIPT:
                    raise
                log.debug("stale receipt for %s on %s: %s", d.message_id, d.queue, error_code(e))

        with map_errors(BusUnavailable, BusError):
            await self._aws.run(call)

    async def _delete_batch(self, batch: Sequence[Delivery]) -> list[BaseException | None]:
        """One ``DeleteMessageBatch`` for deliveries of one queue; an error per failed entry."""

        def call() -> list[BaseException | None]:
            url = self._queue_url(batch[0].queue)
            entries: list[DeleteMessageBatchRequestEntryTypeDef] = [
                {"Id": str(i), "ReceiptHandle": d.receipt} for i, d in enumerate(batch)
            ]
            failed = self._sqs.delete_message_batch(QueueUrl=url, Entries=entries).get("Failed", [])
            errors: list[BaseException | None] = [None] * len(batch)
            for f in failed:
                d = batch[int(f["Id"])]
                if f.get("Code") in _STALE_RECEIPT:
                    log.debug("stale receipt for %s on %s: %s", d.message_id, d.queue, f.get("Code"))
                    continue
                errors[int(f["Id"])] = BusError(f"cannot delete {d.message_id}: {f.get('Message', f)}")
            return errors

        with map_errors(BusUnavailable, BusError):
            return await self._aws.run(call)

    async def stats(self, queue: str) -> QueueStats:
        """``GetQueueAttributes`` of the queue and of the DLQ its ``RedrivePolicy`` names.
        ``oldest_age_s`` is None: SQS only reports it through CloudWatch
        (``ApproximateAgeOfOldestMessage``)."""
        with map_errors(BusUnavailable, BusError):
            return await self._aws.run(lambda: queue_stats(self._sqs, queue, self._queue_url(queue)))

    async def aclose(self) -> None:
        await self._acks.aclose()
        self._aws.close()

    async def __aenter__(self) -> AwsBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = ["AwsBus", "queue_name"]
