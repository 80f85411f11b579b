"""AWS-only behaviour of the SNS+SQS bus, the DynamoDB store and the S3 blob store (moto server)."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

from sdfleet._aws import map_errors
from sdfleet.bus import QueueSpec, Subscription, Topology, open_bus
from sdfleet.bus.backends.aws import AwsBus
from sdfleet.bus.backends.aws_topology import queue_name, queue_policy
from sdfleet.errors import (
    BusError,
    BusUnavailable,
    ConfigError,
    NotFound,
    StorageUnavailable,
    StoreUnavailable,
    ValidationFailed,
)
from sdfleet.storage import open_storage
from sdfleet.storage.backends.s3 import S3BlobStore
from sdfleet.store import open_store
from sdfleet.store.backends.dynamodb import DynamoTaskStore, decode_cursor
from sdfleet.tasks import Task, TaskRecord


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prefix() -> str:
    return f"u{uuid.uuid4().hex[:8]}-"


def _topology(queue: str = "q", policy: dict[str, object] | None = None) -> Topology:
    return Topology(
        topics=["tasks"],
        queues=[QueueSpec(name=queue, lease_s=7, max_receives=4)],
        subscriptions=[Subscription(topic="tasks", queue=queue, filter_policy=policy)],
    )


@pytest.fixture
async def bus(moto_url: str) -> AsyncIterator[AwsBus]:
    async with AwsBus(_prefix()) as b:
        yield b


# -- URLs and names ------------------------------------------------------------------------------


def test_bus_url_forms() -> None:
    bus = AwsBus.from_url("aws://?prefix=fleet-a-&region=eu-west-1&account=123456789012&retries=5")
    assert (bus.prefix, bus._account) == ("fleet-a-", "123456789012")
    assert AwsBus.from_url("aws://").prefix == "sdfleet-"
    assert isinstance(open_bus("aws://?prefix=x-"), AwsBus)
    with pytest.raises(ConfigError):
        AwsBus.from_url("aws://?retries=many")
    seed_url = "https://sqs.us-east-1.amazonaws.com/123456789012/sdoneks-InputQueuesdruntimeA1B2-Xy9Z"
    attached = AwsBus.from_url(f"aws://?prefix=x-&queue.sdruntime={seed_url}&queue.b=SeedQueue&queue.c=")
    assert attached.attached == {"sdruntime": seed_url, "b": "SeedQueue"}


def test_store_and_storage_url_forms() -> None:
    assert DynamoTaskStore.from_url("aws://?table=my-tasks").table == "my-tasks"
    assert DynamoTaskStore.from_url("aws://?prefix=fleet-b-").table == "fleet-b-tasks"
    assert DynamoTaskStore.from_url("aws://?create=false").create_table is False
    assert isinstance(open_store("aws://?table=t"), DynamoTaskStore)
    s3 = S3BlobStore.from_url("s3://bucket/a/b/?region=eu-west-1")
    assert (s3.bucket, s3.prefix, s3.create_bucket) == ("bucket", "a/b", False)
    assert s3.location("x/y.png") == "s3://bucket/a/b/x/y.png"
    assert S3BlobStore.from_url("s3://bucket").location("k.png") == "s3://bucket/k.png"
    assert S3BlobStore.from_url("s3://bucket?create=yes").create_bucket
    assert isinstance(open_storage("s3://bucket/p"), S3BlobStore)
    for bad in ("s3:///prefix", "s3://bucket/../x", "s3://bucket?create=maybe"):
        with pytest.raises((ConfigError, ValidationFailed)):
            S3BlobStore.from_url(bad)


def test_queue_name_rule() -> None:
    assert queue_name("sdfleet-", "sd15") == "sdfleet-sd15"
    for bad in ("has space", "dots.not.allowed", "x" * 80):
        with pytest.raises(ConfigError):
            queue_name("sdfleet-", bad)
    policy = json.loads(queue_policy("arn:q", ["arn:t2", "arn:t1"]))
    (statement,) = policy["Statement"]
    assert statement["Condition"]["ArnEquals"]["aws:SourceArn"] == ["arn:t1", "arn:t2"]
    assert statement["Principal"] == {"Service": "sns.amazonaws.com"}


def test_cursor_must_be_ours() -> None:
    with pytest.raises(ValidationFailed):
        decode_cursor("not base64 at all!")
    with pytest.raises(ValidationFailed):
        decode_cursor("bm9oYXNo")  # "nohash"


def _client_error(code: str, status: int = 400) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AWS.SimpleQueueService.NonExistentQueue", 400, NotFound),
        ("NotFound", 404, NotFound),
        ("ResourceNotFoundException", 400, NotFound),
        ("ThrottlingException", 400, BusUnavailable),
        ("Whatever", 503, BusUnavailable),
        ("InvalidParameter", 400, ValidationFailed),
        ("AccessDenied", 403, ConfigError),
        ("SomethingElse", 400, BusError),
    ],
)
def test_error_mapping(code: str, status: int, expected: type[Exception]) -> None:
    with pytest.raises(expected) as info, map_errors(BusUnavailable, BusError):
        raise _client_error(code, status)
    assert isinstance(info.value.__cause__, ClientError)


# -- bus -----------------------------------------------------------------------------------------


async def test_ensure_sets_queue_and_subscription_attributes(bus: AwsBus) -> None:
    await bus.ensure(_topology(policy={"m": ["x"]}))
    sqs, sns = boto3.client("sqs"), boto3.client("sns")
    url = sqs.get_queue_url(QueueName=f"{bus.prefix}q")["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["VisibilityTimeout"] == "7"
    redrive = json.loads(attrs["RedrivePolicy"])
    assert redrive["maxReceiveCount"] == 4
    assert redrive["deadLetterTargetArn"].endswith(f":{bus.prefix}q-dlq")
    assert "sns.amazonaws.com" in attrs["Policy"]
    topic_arn = sns.create_topic(Name=f"{bus.prefix}tasks")["TopicArn"]
    (sub,) = sns.list_subscriptions_by_topic(TopicArn=topic_arn)["Subscriptions"]
    sub_attrs = sns.get_subscription_attributes(SubscriptionArn=sub["SubscriptionArn"])["Attributes"]
    assert sub_attrs["RawMessageDelivery"] == "true"
    assert json.loads(sub_attrs["FilterPolicy"]) == {"m": ["x"]}


async def test_raw_delivery_off_delivers_the_sns_envelope(bus: AwsBus) -> None:
    await bus.ensure(_topology())
    sns = boto3.client("sns")
    topic_arn = sns.create_topic(Name=f"{bus.prefix}tasks")["TopicArn"]
    (sub,) = sns.list_subscriptions_by_topic(TopicArn=topic_arn)["Subscriptions"]
    sns.set_subscription_attributes(
        SubscriptionArn=sub["SubscriptionArn"], AttributeName="RawMessageDelivery", AttributeValue="false"
    )
    await bus.publish("tasks", b'{"task": 1}', {"runtime": "sdwebui"})
    (d,) = await bus.receive("q", wait_s=1)
    envelope = json.loads(d.body)
    assert envelope["Type"] == "Notification"
    assert envelope["Message"] == '{"task": 1}'
    assert envelope["TopicArn"] == topic_arn
    assert envelope["MessageAttributes"]["runtime"]["Value"] == "sdwebui"
    assert dict(d.attributes) == {}
    await bus.ack(d)
    await bus.ensure(_topology())  # ensure puts raw delivery back
    await bus.publish("tasks", b"raw again", {"runtime": "sdwebui"})
    (d,) = await bus.receive("q", wait_s=1)
    assert (d.body, dict(d.attributes)) == (b"raw again", {"runtime": "sdwebui"})


async def test_existing_topic_by_arn_and_attached_queue_are_used_as_they_are(moto_url: str) -> None:
    sns, sqs = boto3.client("sns"), boto3.client("sqs")
    other = f"u{uuid.uuid4().hex[:8]}"
    topic_arn = sns.create_topic(Name=f"{other}-SeedOutput")["TopicArn"]
    seed_url = sqs.create_queue(QueueName=f"{other}-InputQueue")["QueueUrl"]
    topology = Topology(
        topics=[topic_arn],
        queues=[QueueSpec(name="results"), QueueSpec(name="seed", lease_s=7)],
        subscriptions=[
            Subscription(topic=topic_arn, queue="results"),
            Subscription(topic="in", queue="seed"),
        ],
    )
    async with AwsBus(_prefix(), attach={"seed": f"{other}-InputQueue"}) as bus:
        await bus.ensure(topology)
        pages = sns.get_paginator("list_topics").paginate()  # other tests' topics share the server
        assert [t["TopicArn"] for page in pages for t in page["Topics"]].count(topic_arn) == 1
        (sub,) = sns.list_subscriptions_by_topic(TopicArn=topic_arn)["Subscriptions"]
        assert sub["Endpoint"].endswith(f":{bus.prefix}results")
        attrs = sqs.get_queue_attributes(QueueUrl=seed_url, AttributeNames=["All"])["Attributes"]
        assert "RedrivePolicy" not in attrs and "Policy" not in attrs
        assert attrs["VisibilityTimeout"] == "30"
        in_arn = sns.create_topic(Name=f"{bus.prefix}in")["TopicArn"]
        assert sns.list_subscriptions_by_topic(TopicArn=in_arn)["Subscriptions"] == []
        await bus.publish(topic_arn, b"note", {})
        (d,) = await bus.receive("results", wait_s=1)
        assert d.body == b"note"
        sqs.send_message(QueueUrl=seed_url, MessageBody="seed task")
        (d,) = await bus.receive("seed", wait_s=1)
        assert d.body == b"seed task"
        stats = await bus.stats("seed")
        assert (stats.visible, stats.in_flight, stats.dead_letters) == (0, 1, 0)
        await bus.ack(d)


async def test_publish_without_ensure_resolves_the_topic(bus: AwsBus) -> None:
    await bus.ensure(_topology())
    async with AwsBus(bus.prefix) as fresh:  # an API process that never ran ensure()
        assert await fresh.publish("tasks", b"hello", {})
        (d,) = await fresh.receive("q", wait_s=1)
        assert d.body == b"hello"
        with pytest.raises(NotFound):
            await fresh.receive("missing-queue")


async def test_aws_limits_refused_before_sending(bus: AwsBus) -> None:
    await bus.ensure(_topology())
    with pytest.raises(ValidationFailed):
        await bus.publish("tasks", b"", {})
    with pytest.raises(ValidationFailed):
        await bus.publish("tasks", b"\xff\xfe", {})
    with pytest.raises(ValidationFailed):
        await bus.publish("tasks", b"x", {"empty": ""})
    with pytest.raises(ValidationFailed):
        await bus.publish("tasks", b"x", {f"k{i}": "v" for i in range(11)})


async def test_cancelled_long_poll_hands_messages_back(bus: AwsBus) -> None:
    await bus.ensure(_topology())
    poll = asyncio.create_task(bus.receive("q", wait_s=3, lease_s=60))
    await asyncio.sleep(0.3)
    poll.cancel()
    await bus.publish("tasks", b"caught by a cancelled poll", {})
    with pytest.raises(asyncio.CancelledError):
        await poll
    (d,) = await bus.receive("q", wait_s=2, lease_s=60)  # not hidden for the 60 s lease
    assert d.body == b"caught by a cancelled poll"


async def test_endpoint_down_maps_to_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    async with AwsBus.from_url("aws://?prefix=down-&account=123456789012&retries=1") as bus:
        with pytest.raises(BusUnavailable):
            await bus.publish("tasks", b"x", {})
        with pytest.raises(BusUnavailable):
            await bus.receive("q")
    async with DynamoTaskStore.from_url("aws://?table=down&retries=1") as store:
        with pytest.raises(StoreUnavailable):
            await store.get("t", "x")
    async with S3BlobStore.from_url("s3://down/p?retries=1") as blobs:
        with pytest.raises(StorageUnavailable):
            await blobs.get("x.png")


# -- store and storage ---------------------------------------------------------------------------


async def test_store_creates_its_table_with_the_tenant_index(moto_url: str) -> None:
    table = f"t-{uuid.uuid4().hex[:10]}"
    async with DynamoTaskStore.from_url(f"aws://?table={table}") as store:
        rec = TaskRecord(task=Task(tenant="acme"))
        assert (await store.create(rec))[1]
    desc = boto3.client("dynamodb").describe_table(TableName=table)["Table"]
    assert desc["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    indexes = {
        g["IndexName"]: [k["AttributeName"] for k in g["KeySchema"]] for g in desc["GlobalSecondaryIndexes"]
    }
    assert indexes == {"by-tenant": ["tenant", "sk"], "by-tenant-active": ["active", "sk"]}
    async with DynamoTaskStore.from_url(f"aws://?table=missing-{table}&create=false") as store:
        with pytest.raises(NotFound):
            await store.get("t", "x")


async def test_s3_presigned_url_downloads_and_bucket_is_not_created_by_default(moto_url: str) -> None:
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    async with S3BlobStore.from_url(f"s3://{bucket}/out") as blobs:
        with pytest.raises(NotFound):
            await blobs.put("a.png", b"x", "image/png")
    async with S3BlobStore.from_url(f"s3://{bucket}/out?create=true") as blobs:
        await blobs.put("t/1/1-0.png", b"\x89PNG", "image/png")
        url = await blobs.presign("t/1/1-0.png", 60)
        assert url is not None and url.startswith(moto_url)
        async with httpx.AsyncClient() as http:
            got = await http.get(url)
        assert (got.status_code, got.content) == (200, b"\x89PNG")
    head = boto3.client("s3").head_object(Bucket=bucket, Key="out/t/1/1-0.png")
    assert head["ContentType"] == "image/png"
