"""AWS only (moto): an sdfleet agent drains a seed deployment's queue in place, and
``sdfleet queues`` reads SQS depth.

The seed's CDK (``lib/runtime/sdRuntime.ts``) builds, per runtime, an input SQS queue with a
generated name, subscribed to the input SNS topic *without* RawMessageDelivery and with the
filter policy ``{"$or": [{"sd_model_checkpoint": [<ckpt>]}, {"runtime": [<id>]}]}``; its queue
agent gets the queue URL, the output bucket and the output SNS topic. Here boto3 builds the same
against moto, the seed's Lambda messages are published to the input topic, and the fleet's queue
``sdruntime`` is attached to the seed's queue with ``aws://?queue.sdruntime=<queue url>``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from fleet_tools import png_size, receive_json, wait_adopted

from conftest import (
    SD15,
    Engine,
    StartFleet,
    dedicated_and_dynamic,
    fleet_settings,
    subprocess_env,
)
from sdfleet.bus import open_bus
from sdfleet.routing import fleet_topology
from sdfleet.settings import FleetConfig, QueueConfig
from sdfleet.storage import open_storage
from seed_payloads import (
    V1ALPHA1_I2I,
    V1ALPHA1_T2I,
    V1ALPHA2_I2I,
    V1ALPHA2_T2I,
    copy_of,
    lambda_message,
    with_image_link,
)

pytestmark = pytest.mark.timeout(120)

SEED_RUNTIME = "sdruntime"


@dataclass
class SeedDeployment:
    """What the seed's CDK made: input topic → input queue (raw delivery off), output topic, bucket."""

    ns: str
    input_topic: str
    queue_url: str
    output_topic: str
    bucket: str
    backend_queue_url: str

    def publish(self, message: str, attributes: dict[str, str]) -> None:
        """What the seed's input Lambda does: ``sns.publish`` with String message attributes."""
        attrs = {k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()}
        boto3.client("sns").publish(TopicArn=self.input_topic, Message=message, MessageAttributes=attrs)


def _seed_queue(sqs: Any, sns: Any, ns: str, topic_arn: str) -> str:
    url = sqs.create_queue(QueueName=f"{ns}-InputQueue{SEED_RUNTIME}A1B2C3D4-Xy9Zq")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
            }
        ],
    }
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(policy)})
    filter_policy = {"$or": [{"sd_model_checkpoint": [SD15]}, {"runtime": [SEED_RUNTIME]}]}
    sns.subscribe(
        TopicArn=topic_arn,
        Protocol="sqs",
        Endpoint=arn,
        Attributes={"FilterPolicy": json.dumps(filter_policy), "FilterPolicyScope": "MessageAttributes"},
    )
    return str(url)


@pytest.fixture
def seed(moto_url: str) -> SeedDeployment:
    ns = f"s{uuid.uuid4().hex[:8]}"
    sns, sqs, s3 = boto3.client("sns"), boto3.client("sqs"), boto3.client("s3")
    input_topic = sns.create_topic(Name=f"{ns}-sdNotificationLambda")["TopicArn"]
    output_topic = sns.create_topic(Name=f"{ns}-sdNotificationOutput")["TopicArn"]
    bucket = f"{ns}-outputbucket"
    s3.create_bucket(Bucket=bucket)
    backend = sqs.create_queue(QueueName=f"{ns}-sdNotificationOutputQueue")["QueueUrl"]
    backend_arn = sqs.get_queue_attributes(QueueUrl=backend, AttributeNames=["QueueArn"])["Attributes"]
    sns.subscribe(TopicArn=output_topic, Protocol="sqs", Endpoint=backend_arn["QueueArn"])
    queue_url = _seed_queue(sqs, sns, ns, input_topic)
    return SeedDeployment(ns, input_topic, queue_url, output_topic, bucket, backend)


@pytest.fixture
def engine(seed: SeedDeployment) -> Engine:
    """The conftest ``engine``, on AWS only, with ``sdruntime`` attached to the seed's queue."""
    bus = f"aws://?prefix={seed.ns}-&region=us-east-1&queue.{SEED_RUNTIME}={seed.queue_url}"
    return Engine("aws", bus, bus, f"s3://{seed.bucket}?region=us-east-1")


def _seed_messages(version: str, image_url: str, bucket: str) -> list[tuple[str, dict[str, str]]]:
    payloads = (
        [V1ALPHA1_T2I, with_image_link(V1ALPHA1_I2I, image_url)]
        if version == "v1alpha1"
        else [V1ALPHA2_T2I, with_image_link(V1ALPHA2_I2I, image_url)]
    )
    return [lambda_message(version, p, bucket=bucket) for p in payloads]


def _meta(message: str) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads(message)["metadata"]
    return meta


def _publish_and_peek(seed: SeedDeployment, messages: list[tuple[str, dict[str, str]]]) -> None:
    for message, attributes in messages:
        seed.publish(message, attributes)
    seed.publish(json.dumps({"metadata": {}, "content": {}}), {"runtime": "someone-else"})  # filtered out
    peek = boto3.client("sqs").receive_message(
        QueueUrl=seed.queue_url, MaxNumberOfMessages=10, VisibilityTimeout=0
    )
    bodies = [json.loads(m["Body"]) for m in peek["Messages"]]
    assert len(bodies) == len(messages)
    assert all(b["Type"] == "Notification" and b["TopicArn"] == seed.input_topic for b in bodies)


async def _assert_outputs(engine: Engine, meta: dict[str, Any], view: dict[str, Any]) -> None:
    assert view["state"] == "succeeded", view
    assert view["queue"] == SEED_RUNTIME
    (key,) = [i["key"] for i in view["images"]]
    assert re.fullmatch(rf"{meta['prefix']}/{meta['id']}/{meta['id']}-[0-9a-f]{{4}}-1\.png", key), key
    assert await png_size(engine, key) == (512, 512)
    storage = open_storage(engine.storage_url)
    try:
        out = json.loads(await storage.get(key.replace("-1.png", ".out")))
    finally:
        await storage.aclose()
    assert out["task_id"] == meta["id"]


def _assert_notification(seed: SeedDeployment, meta: dict[str, Any], note: dict[str, Any]) -> None:
    assert note["result"] is True and note["status"] == "completed"
    base = f"s3://{seed.bucket}/{meta['prefix']}/{meta['id']}/{meta['id']}-"
    (url,) = note["image_url"]
    assert re.fullmatch(rf"{re.escape(base)}[0-9a-f]{{4}}-1\.png", url), url
    assert note["output_url"] == url.replace("-1.png", ".out")
    assert note["runtime"] == SEED_RUNTIME


def _assert_seed_queue_untouched(seed: SeedDeployment) -> None:
    """Attached, not adopted: the seed's queue keeps its policy, no redrive, one raw-off subscription."""
    attrs = boto3.client("sqs").get_queue_attributes(QueueUrl=seed.queue_url, AttributeNames=["All"])
    left = attrs["Attributes"]
    assert (left["ApproximateNumberOfMessages"], left["ApproximateNumberOfMessagesNotVisible"]) == ("0", "0")
    statement = json.loads(left["Policy"])["Statement"][0]
    assert statement["Condition"]["ArnEquals"] == {"aws:SourceArn": seed.input_topic}
    assert "RedrivePolicy" not in left
    sns = boto3.client("sns")
    # Every page: one moto serves the whole session, and a page holds 100 subscriptions.
    pages = sns.get_paginator("list_subscriptions").paginate()
    mine = [x for page in pages for x in page["Subscriptions"] if x["Endpoint"] == left["QueueArn"]]
    assert [x["TopicArn"] for x in mine] == [seed.input_topic]
    sub = sns.get_subscription_attributes(SubscriptionArn=mine[0]["SubscriptionArn"])["Attributes"]
    assert sub.get("RawMessageDelivery", "false") == "false"


def _backend_notifications(seed: SeedDeployment) -> dict[str, dict[str, Any]]:
    """What the seed's application backend reads: SNS envelopes on its queue of the output topic."""
    sqs = boto3.client("sqs")
    got = sqs.receive_message(QueueUrl=seed.backend_queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
    envelopes = [json.loads(m["Body"]) for m in got.get("Messages", [])]
    assert all(e["Type"] == "Notification" and e["TopicArn"] == seed.output_topic for e in envelopes)
    return {n["id"]: n for n in (json.loads(e["Message"]) for e in envelopes)}


@pytest.mark.parametrize(
    ("version", "results_topic"),
    [("v1alpha1", "sdfleet"), ("v1alpha2", "seed-output")],
    ids=["v1alpha1-sdfleet-results-topic", "v1alpha2-seed-output-topic"],
)
async def test_agent_drains_seed_queue_in_place(
    version: str,
    results_topic: str,
    seed: SeedDeployment,
    engine: Engine,
    start_fleet: StartFleet,
    models_dir: Path,
    image_url: str,
) -> None:
    messages = _seed_messages(version, image_url, seed.bucket)
    _publish_and_peek(seed, messages)
    queues = [QueueConfig(name=SEED_RUNTIME, model=SD15)]
    settings = fleet_settings(engine, models_dir, queues)
    if results_topic == "seed-output":
        # docs/aws.md's recipe: nothing created at start, results on the seed's own output topic,
        # so the seed's application backend keeps receiving them
        settings.ensure_topology = False
        settings.fleet.results_topic, settings.fleet.results_queue = seed.output_topic, None
    fleet = await start_fleet(queues, settings=settings)
    metas = [_meta(message) for message, _ in messages]
    for meta in metas:
        await _assert_outputs(engine, meta, await wait_adopted(fleet, meta["id"]))
    if results_topic == "seed-output":
        notes = _backend_notifications(seed)
    else:
        notes = {n["id"]: n for n in await receive_json(engine, "results", len(messages), rounds=20)}
    assert set(notes) == {m["id"] for m in metas}
    for meta in metas:
        _assert_notification(seed, meta, notes[meta["id"]])
    _assert_seed_queue_untouched(seed)


def _queues(engine: Engine, config: Path) -> subprocess.CompletedProcess[str]:
    """``sdfleet queues`` as a subprocess, on a wide terminal without colours."""
    env = {**subprocess_env(engine, config), "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-c", "from sdfleet.cli import main; main()", "queues", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _queues_table(engine: Engine, config: Path) -> dict[str, list[str]]:
    """``sdfleet queues`` → {queue: [runtime, visible, in flight, delayed, age, dead]}."""
    done = _queues(engine, config)
    assert done.returncode == 0, done.stderr
    rows: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 7 and cells[2].isdigit():
            rows[cells[0]] = cells[1:]
    return rows


async def test_queues_command_shows_sqs_depth(seed: SeedDeployment, engine: Engine, tmp_path: Path) -> None:
    queues = [*dedicated_and_dynamic(), QueueConfig(name=SEED_RUNTIME, model=SD15)]
    fleet = FleetConfig(queues=queues)
    config = tmp_path / "sdfleet.yaml"
    config.write_text(yaml.safe_dump(fleet.model_dump(mode="json")))
    # before ensure: the queue named (SQS's own words: "GetQueueUrl: AWS.SimpleQueueService...")
    before = _queues(engine, config)
    assert before.returncode == 2, before.stderr
    said = r"error: queue '\S+sd15' does not exist: create the fleet's queues with `sdfleet ensure`"
    assert re.match(said, before.stderr), before.stderr
    bus = open_bus(engine.bus_url)
    try:
        await bus.ensure(fleet_topology(fleet))
        for model in (SD15, SD15, SD15, "anything-v3.safetensors"):
            await bus.publish("tasks", b'{"queued": true}', {"sd_model_checkpoint": model})
        seed.publish(*lambda_message("v1alpha2", V1ALPHA2_T2I, bucket=seed.bucket))
        rows = _queues_table(engine, config)
        assert rows["sd15"][:3] == ["diffusers", "3", "0"]
        assert rows["dynamic"][:3] == ["diffusers", "1", "0"]
        assert rows[SEED_RUNTIME][:3] == ["diffusers", "1", "0"]
        assert rows["sd15"][5] == "0"
        taken = await bus.receive("sd15", max_messages=1, wait_s=1, lease_s=60)
        seed_taken = await bus.receive(SEED_RUNTIME, max_messages=1, wait_s=1, lease_s=60)
        assert len(taken) == len(seed_taken) == 1
        rows = _queues_table(engine, config)
        assert rows["sd15"][1:3] == ["2", "1"]
        assert rows["dynamic"][1:3] == ["1", "0"]
        assert rows[SEED_RUNTIME][1:3] == ["0", "1"]
    finally:
        await bus.aclose()


async def test_poison_on_the_seeds_queue_without_a_dlq_is_deleted_after_max_receives(
    seed: SeedDeployment,
    engine: Engine,
    start_fleet: StartFleet,
    models_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The seed's queue has no RedrivePolicy: released, an undecodable message came back about once a
    second forever, and kept KEDA's queue length (and a GPU worker) up. The seed's agent deletes it."""
    queues = [QueueConfig(name=SEED_RUNTIME, model=SD15)]
    settings = fleet_settings(engine, models_dir, queues)
    settings.fleet.retry.max_receives = 2
    bad = copy_of(V1ALPHA2_T2I)
    bad["task"]["metadata"].update(id="inpaint-1", tasktype="inpaint")
    seed.publish("not json at all", {"runtime": SEED_RUNTIME})
    seed.publish(json.dumps(bad["task"]), {"runtime": SEED_RUNTIME})
    fleet = await start_fleet(queues, settings=settings)
    sqs = boto3.client("sqs")
    for _ in range(300):
        attrs = sqs.get_queue_attributes(QueueUrl=seed.queue_url, AttributeNames=["All"])["Attributes"]
        if attrs["ApproximateNumberOfMessages"] == attrs["ApproximateNumberOfMessagesNotVisible"] == "0":
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"the poison is still on the seed's queue: {attrs}")
    deleted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("deleted message")]
    assert len(deleted) == 2 and all("no dead-letter queue" in m for m in deleted), deleted
    assert any("not json at all" in m for m in deleted), "the message is in the log for a human"
    # and the agent serves on
    message, attributes = lambda_message("v1alpha2", V1ALPHA2_T2I, bucket=seed.bucket)
    seed.publish(message, attributes)
    await _assert_outputs(engine, _meta(message), await wait_adopted(fleet, _meta(message)["id"]))


async def test_a_second_post_waits_on_the_seeds_queue_past_max_receives_for_the_first_run(
    seed: SeedDeployment,
    engine: Engine,
    start_fleet: StartFleet,
    models_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The seed's Lambda publishes a second POST of an id while its first run is still going on
    another agent (a record running under another worker's name, for another SNS publish). On the
    seed's queue, which has no dead-letter queue, the message waits as long as that run lasts, past
    ``max_receives`` receives (neither deleted as poison nor failed), then runs as the next run."""
    import time

    from sdfleet.messages import decode_task
    from sdfleet.store import open_store
    from sdfleet.store.base import transition
    from sdfleet.tasks import TaskRecord, TaskState

    caplog.set_level(logging.INFO, logger="sdfleet.agent.task")
    queues = [QueueConfig(name=SEED_RUNTIME, model=SD15)]
    settings = fleet_settings(engine, models_dir, queues, lease_s=2)
    settings.fleet.retry.max_receives = 2
    message, attributes = lambda_message("v1alpha2", V1ALPHA2_T2I, bucket=seed.bucket)
    meta = _meta(message)
    task = decode_task(message.encode(), attributes).model_copy(update={"queue": SEED_RUNTIME})
    store = open_store(engine.store_url)
    try:
        running = TaskRecord(
            task=task, state=TaskState.RUNNING, worker="ghost", attempts=1, message_id="sns-0"
        )
        assert (await store.create(running))[1]
        fleet = await start_fleet(queues, settings=settings)
        seed.publish(message, attributes)
        deferred: list[str] = []
        for _ in range(200):
            deferred = [r.getMessage() for r in caplog.records if "deferred" in r.getMessage()]
            if len(deferred) > settings.fleet.retry.max_receives:
                break
            await asyncio.sleep(0.1)
        assert len(deferred) > settings.fleet.retry.max_receives, deferred
        record = await store.get("default", meta["id"])
        assert record is not None and record.worker == "ghost" and record.task.run == 1, record

        def ended(r: TaskRecord) -> TaskRecord:
            r.state, r.finished_at = TaskState.CANCELLED, time.time()
            return r

        await transition(store, "default", meta["id"], ended)
        for _ in range(300):
            view = (await fleet.http.get(f"/v1/tasks/{meta['id']}")).json()
            if view["run"] == 2 and view["finished_at"] is not None:
                break
            await asyncio.sleep(0.1)
    finally:
        await store.aclose()
    await _assert_outputs(engine, meta, view)
    assert not [r for r in caplog.records if r.getMessage().startswith("deleted message")]
    notes = [n for n in await receive_json(engine, "results", 1) if n["id"] == meta["id"]]
    assert [n["result"] for n in notes] == [True], notes
    _assert_seed_queue_untouched(seed)
