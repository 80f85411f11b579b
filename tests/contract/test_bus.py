"""The bus contract: every backend (``conftest.BUS_BACKENDS``) passes this suite unchanged.

Leases are whole seconds (SQS visibility timeouts are integers); sleeps stay just past them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import boto3
import pytest

from sdfleet.bus import Bus, Delivery, QueueSpec, Subscription, Topology, dlq_name
from sdfleet.bus.backends.aws_topology import queue_name
from sdfleet.errors import NotFound, PayloadTooLarge, ValidationFailed

if TYPE_CHECKING:  # another test folder's conftest may be the one imported under that name
    from conftest import BusFactory

SD15 = "v1-5-pruned-emaonly.safetensors"


def topology(ns: str, subs: dict[str, dict[str, Any] | None], **queue_kw: Any) -> Topology:
    """Topic ``<ns>-tasks`` with one queue ``<ns>-<name>`` per entry, subscribed with that filter."""
    topic = f"{ns}-tasks"
    return Topology(
        topics=[topic],
        queues=[QueueSpec(name=f"{ns}-{name}", **queue_kw) for name in subs],
        subscriptions=[
            Subscription(topic=topic, queue=f"{ns}-{name}", filter_policy=p) for name, p in subs.items()
        ],
    )


async def drain(bus: Bus, queue: str, *, lease_s: float = 30) -> list[Delivery]:
    """Everything visible in ``queue`` now (leased, not acked)."""
    out: list[Delivery] = []
    while got := await bus.receive(queue, max_messages=10, lease_s=lease_s):
        out.extend(got)
    return out


async def bodies(bus: Bus, queue: str) -> list[bytes]:
    return sorted(d.body for d in await drain(bus, queue))


async def test_ensure_is_idempotent(bus: Bus, ns: str) -> None:
    topo = topology(ns, {"a": None})
    await bus.ensure(topo)
    await bus.ensure(topo)
    await bus.publish(f"{ns}-tasks", b"once", {})
    assert await bodies(bus, f"{ns}-a") == [b"once"]


async def test_ensure_updates_filter_policy(bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": {"color": ["red"]}}))
    await bus.publish(f"{ns}-tasks", b"red-1", {"color": "red"})
    await bus.ensure(topology(ns, {"a": {"color": ["blue"]}}))
    await bus.publish(f"{ns}-tasks", b"red-2", {"color": "red"})
    await bus.publish(f"{ns}-tasks", b"blue-2", {"color": "blue"})
    assert await bodies(bus, f"{ns}-a") == [b"blue-2", b"red-1"]


async def test_publish_receive_round_trip(bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": None}))
    body = json.dumps({"prompt": "a cat, été ✓", "steps": 2}).encode()
    attrs = {"sd_model_checkpoint": SD15, "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "n": "42"}
    before = time.time()
    message_id = await bus.publish(f"{ns}-tasks", body, attrs)
    (d,) = await bus.receive(f"{ns}-a", max_messages=10, lease_s=30)
    assert message_id
    assert d.queue == f"{ns}-a"
    assert d.body == body
    assert dict(d.attributes) == attrs
    assert d.receive_count == 1
    assert d.message_id and d.receipt
    assert before - 2 <= d.sent_at <= time.time() + 2


async def test_routing_by_attribute_policy(bus: Bus, ns: str) -> None:
    dedicated = {"sd_model_checkpoint": [SD15]}
    dynamic = {"sd_model_checkpoint": [{"anything-but": [SD15]}]}
    await bus.ensure(topology(ns, {"sd15": dedicated, "dynamic": dynamic}))
    await bus.publish(f"{ns}-tasks", b"to-sd15", {"sd_model_checkpoint": SD15})
    await bus.publish(f"{ns}-tasks", b"to-dynamic", {"sd_model_checkpoint": "sdxl.safetensors"})
    assert await bodies(bus, f"{ns}-sd15") == [b"to-sd15"]
    assert await bodies(bus, f"{ns}-dynamic") == [b"to-dynamic"]


async def test_a_number_attribute_routes_by_numeric_and_exact_number_policies(bus: Bus, ns: str) -> None:
    """``priority`` is a number on every engine (an SNS ``Number`` on AWS, where ``numeric`` never
    matches a ``String``): priority lanes route alike everywhere, and it arrives as published."""
    lanes = {
        "urgent": {"priority": [{"numeric": [">=", 5]}]},
        "picked": {"priority": [3]},  # an exact number: SNS matches a Number 3, not the text "3"
        "rest": {"$or": [{"priority": [{"exists": False}]}, {"priority": [{"numeric": ["<", 5]}]}]},
    }
    await bus.ensure(topology(ns, lanes))
    for priority in ("9", "5", "4.5", "3", "0"):
        await bus.publish(f"{ns}-tasks", f"p{priority}".encode(), {"priority": priority, "tenant": "t"})
    await bus.publish(f"{ns}-tasks", b"none", {"tenant": "t"})
    assert await bodies(bus, f"{ns}-urgent") == [b"p5", b"p9"]
    assert await bodies(bus, f"{ns}-picked") == [b"p3"]
    rest = await drain(bus, f"{ns}-rest")
    assert sorted(d.body for d in rest) == [b"none", b"p0", b"p3", b"p4.5"]
    assert {d.attributes.get("priority") for d in rest} == {None, "0", "3", "4.5"}
    for bad in ("high", "1e10", "nan"):
        with pytest.raises(ValidationFailed, match="'priority' must be a number"):
            await bus.publish(f"{ns}-tasks", b"bad", {"priority": bad})
    assert await bus.receive(f"{ns}-rest", max_messages=10) == []


async def test_routing_by_message_body_policy(bus: Bus, ns: str) -> None:
    topic = f"{ns}-tasks"
    await bus.ensure(
        Topology(
            topics=[topic],
            queues=[QueueSpec(name=f"{ns}-comfy"), QueueSpec(name=f"{ns}-rest")],
            subscriptions=[
                Subscription(
                    topic=topic,
                    queue=f"{ns}-comfy",
                    filter_policy={"task": {"runtime": ["comfyui"]}},
                    scope="MessageBody",
                ),
                Subscription(
                    topic=topic,
                    queue=f"{ns}-rest",
                    filter_policy={"task": {"runtime": [{"anything-but": ["comfyui"]}]}},
                    scope="MessageBody",
                ),
            ],
        )
    )
    comfy = json.dumps({"task": {"runtime": "comfyui", "id": "1"}}).encode()
    a1111 = json.dumps({"task": {"runtime": "sdwebui", "id": "2"}}).encode()
    await bus.publish(topic, comfy, {})
    await bus.publish(topic, a1111, {})
    assert await bodies(bus, f"{ns}-comfy") == [comfy]
    assert await bodies(bus, f"{ns}-rest") == [a1111]


async def test_fan_out_to_two_queues(bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": None, "b": {"tier": ["paid", "free"]}}))
    await bus.publish(f"{ns}-tasks", b"both", {"tier": "paid"})
    assert await bodies(bus, f"{ns}-a") == [b"both"]
    assert await bodies(bus, f"{ns}-b") == [b"both"]


async def test_no_matching_subscription_delivers_nothing(bus: Bus, ns: str) -> None:
    dynamic = {"sd_model_checkpoint": [{"anything-but": [SD15]}]}
    await bus.ensure(topology(ns, {"sd15": {"sd_model_checkpoint": [SD15]}, "dynamic": dynamic}))
    await bus.publish(f"{ns}-tasks", b"no-attribute", {"other": "x"})
    for q in ("sd15", "dynamic"):
        assert await bus.receive(f"{ns}-{q}", max_messages=10) == []
        stats = await bus.stats(f"{ns}-{q}")
        assert (stats.visible, stats.in_flight) == (0, 0)


async def test_unknown_topic_raises_not_found(bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": None}))
    with pytest.raises(NotFound):
        await bus.publish(f"{ns}-missing", b"x", {})


async def test_lease_expiry_redelivers(bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": None}))
    await bus.publish(f"{ns}-tasks", b"m", {})
    (first,) = await bus.receive(f"{ns}-a", lease_s=1)
    assert await bus.receive(f"{ns}-a") == []
    await asyncio.sleep(1.3)
    (again,) = await bus.receive(f"{ns}-a", lease_s=30)
    assert again.body == b"m"
    assert (first.receive_count, again.receive_count) == (1, 2)


async def test_extend_keeps_message_hidden_past_lease(bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": None}))
    await bus.publish(f"{ns}-tasks", b"m", {})
    (d,) = await bus.receive(f"{ns}-a", lease_s=1)
    await asyncio.sleep(0.5)
    await bus.extend(d, 3)
    await asyncio.sleep(1.0)
    assert await bus.receive(f"{ns}-a") == []
    await bus.ack(d)
    assert (await bus.stats(f"{ns}-a")).in_flight == 0


async def test_release_with_delay(bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": None}))
    await bus.publish(f"{ns}-tasks", b"m", {})
    (d,) = await bus.receive(f"{ns}-a", lease_s=30)
    await bus.release(d, delay_s=1)
    assert await bus.receive(f"{ns}-a") == []
    stats = await bus.stats(f"{ns}-a")
    assert (stats.visible, stats.in_flight + stats.delayed) == (0, 1)
    await asyncio.sleep(1.3)
    (again,) = await bus.receive(f"{ns}-a", lease_s=30)
    assert (again.body, again.receive_count) == (b"m", 2)


async def test_release_zero_is_visible_at_once(bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": None}))
    await bus.publish(f"{ns}-tasks", b"m", {})
    (d,) = await bus.receive(f"{ns}-a", lease_s=30)
    await bus.release(d)
    (again,) = await bus.receive(f"{ns}-a", lease_s=30)
    assert (again.body, again.receive_count) == (b"m", 2)


async def test_ack_removes(bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": None}))
    await bus.publish(f"{ns}-tasks", b"m", {})
    (d,) = await bus.receive(f"{ns}-a", lease_s=1)
    await bus.ack(d)
    await asyncio.sleep(1.2)
    assert await bus.receive(f"{ns}-a") == []
    stats = await bus.stats(f"{ns}-a")
    assert (stats.visible, stats.in_flight, stats.delayed) == (0, 0, 0)


async def test_a_stale_receipt_cannot_ack_extend_or_release_a_re_leased_message(bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": None}))
    await bus.publish(f"{ns}-tasks", b"m", {})
    (stale,) = await bus.receive(f"{ns}-a", lease_s=1)
    await asyncio.sleep(1.3)
    (current,) = await bus.receive(f"{ns}-a", lease_s=30)
    await bus.ack(stale)
    await bus.extend(stale, 1)
    await bus.release(stale)
    stats = await bus.stats(f"{ns}-a")
    assert (stats.visible, stats.in_flight) == (0, 1)
    await bus.ack(current)
    stats = await bus.stats(f"{ns}-a")
    assert (stats.visible, stats.in_flight) == (0, 0)


async def test_max_receives_moves_to_dlq(bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": None}, max_receives=2))
    await bus.publish(f"{ns}-tasks", b"poison", {"k": "v"})
    for n in (1, 2):
        (d,) = await bus.receive(f"{ns}-a", lease_s=30)
        assert d.receive_count == n
        await bus.release(d)
    assert await bus.receive(f"{ns}-a", max_messages=10) == []
    assert (await bus.stats(f"{ns}-a")).dead_letters == 1
    (dead,) = await bus.receive(dlq_name(f"{ns}-a"), lease_s=30)
    assert (dead.body, dict(dead.attributes)) == (b"poison", {"k": "v"})
    assert dead.queue == dlq_name(f"{ns}-a")
    await bus.ack(dead)
    assert (await bus.stats(f"{ns}-a")).dead_letters == 0


async def test_stats(bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": None}))
    empty = await bus.stats(f"{ns}-a")
    assert (empty.queue, empty.visible, empty.in_flight, empty.dead_letters) == (f"{ns}-a", 0, 0, 0)
    assert empty.oldest_age_s in (None, 0)
    for i in range(3):
        await bus.publish(f"{ns}-tasks", f"m{i}".encode(), {})
    await bus.receive(f"{ns}-a", lease_s=30)
    stats = await bus.stats(f"{ns}-a")
    assert (stats.visible, stats.in_flight, stats.delayed, stats.dead_letters) == (2, 1, 0, 0)
    # Backends that cannot know the age (SQS has it only in CloudWatch) report None.
    assert stats.oldest_age_s is None or 0 <= stats.oldest_age_s < 60


async def test_long_poll_returns_early_on_publish(bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": None}))

    async def publish_soon() -> None:
        await asyncio.sleep(0.3)
        await bus.publish(f"{ns}-tasks", b"late", {})

    start = time.monotonic()
    got, _ = await asyncio.gather(bus.receive(f"{ns}-a", wait_s=5, lease_s=30), publish_soon())
    assert [d.body for d in got] == [b"late"]
    assert 0.25 <= time.monotonic() - start < 3


@pytest.mark.parametrize("bus_factory", ["sqlite", "redis"], indirect=True)
async def test_a_waiting_receive_ends_when_until_is_set_and_claims_nothing(bus: Bus, ns: str) -> None:
    """What a stopping agent's receive does: it ends its wait at once rather than after
    ``wait_s``. (SQS: a long poll may lease messages, so it runs out; not tested here.)"""
    await bus.ensure(topology(ns, {"a": None}))
    until = asyncio.Event()
    receive = asyncio.create_task(bus.receive(f"{ns}-a", wait_s=30, lease_s=30, until=until))
    await asyncio.sleep(0.5)
    assert not receive.done(), "it waits while nothing comes"
    until.set()
    assert await asyncio.wait_for(receive, timeout=5) == [], "ended well before its 30 s"
    await bus.publish(f"{ns}-tasks", b"after", {})
    (d,) = await bus.receive(f"{ns}-a", wait_s=5, lease_s=30, until=until)  # set: it still reads once
    assert d.body == b"after" and d.receive_count == 1


async def test_concurrent_receivers_never_share(bus_factory: Callable[[], Bus], bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": None}))
    for i in range(20):
        await bus.publish(f"{ns}-tasks", f"m{i:02}".encode(), {})
    seen: list[bytes] = []

    async def worker(client: Bus) -> None:
        deadline = time.monotonic() + 10
        while len(seen) < 20 and time.monotonic() < deadline:
            for d in await client.receive(f"{ns}-a", max_messages=3, wait_s=0.2, lease_s=30):
                seen.append(d.body)
                await client.ack(d)

    await asyncio.gather(worker(bus), worker(bus_factory()))
    assert sorted(seen) == [f"m{i:02}".encode() for i in range(20)]


async def test_max_messages_respected(bus: Bus, ns: str) -> None:
    await bus.ensure(topology(ns, {"a": None}))
    for i in range(5):
        await bus.publish(f"{ns}-tasks", f"m{i}".encode(), {})
    first = await bus.receive(f"{ns}-a", max_messages=3, wait_s=1, lease_s=30)
    assert 1 <= len(first) <= 3
    rest = await drain(bus, f"{ns}-a")
    assert sorted(d.body for d in first + rest) == [f"m{i}".encode() for i in range(5)]


async def test_a_message_over_the_engines_limit_is_refused_naming_it(bus: Bus, ns: str) -> None:
    """SNS takes 256 KiB with the attributes; its own refusal ("InvalidParameter ... Message too
    long") names no limit and reached clients as engine text. Other engines carry the message."""
    from sdfleet.bus.backends.aws import SNS_MAX_BYTES, AwsBus

    await bus.ensure(topology(ns, {"a": None}))
    body = b"x" * (SNS_MAX_BYTES - 40)
    if isinstance(bus, AwsBus):
        with pytest.raises(PayloadTooLarge, match="takes at most 256 KiB: send input images as"):
            await bus.publish(f"{ns}-tasks", body, {"sd_model_checkpoint": SD15})
        await bus.publish(f"{ns}-tasks", body[:-100], {"sd_model_checkpoint": SD15})  # just under
        assert [len(b) for b in await bodies(bus, f"{ns}-a")] == [len(body) - 100]
    else:
        await bus.publish(f"{ns}-tasks", body, {"sd_model_checkpoint": SD15})
        assert await bodies(bus, f"{ns}-a") == [body]


async def test_a_message_is_kept_its_queues_retention_read_or_not(
    bus: Bus, bus_factory: BusFactory, ns: str
) -> None:
    """SQS's ``MessageRetentionPeriod``: a message older than its queue's retention is gone, so a
    queue nobody drains (a webhooks-only fleet's results queue) stops growing; a dead letter is
    kept its dead-letter queue's 14 days. SQS takes 60 s at least and moto honours it on receive,
    so on the aws engine the test reads the attributes ``ensure`` set instead of waiting."""
    a, b = f"{ns}-a", f"{ns}-b"
    await bus.ensure(topology(ns, {"a": None, "b": None}, retention_s=1.0, max_receives=1))
    if bus_factory.backend == "aws":
        sqs = boto3.client("sqs", region_name="us-east-1")
        try:
            for queue, want in ((a, "60"), (dlq_name(a), str(14 * 86400))):
                url = sqs.get_queue_url(QueueName=queue_name(ns_prefix(bus_factory.url), queue))["QueueUrl"]
                got = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["MessageRetentionPeriod"])
                assert got["Attributes"]["MessageRetentionPeriod"] == want, queue
        finally:
            sqs.close()
        return
    for body in (b"old-1", b"old-2"):
        await bus.publish(f"{ns}-tasks", body, {})
    assert len(await bus.receive(b, max_messages=10, lease_s=0.05)) == 2
    await asyncio.sleep(0.1)
    assert await bus.receive(b, max_messages=10) == [], "received once: both dead-lettered"
    await asyncio.sleep(1.1)
    await bus.publish(f"{ns}-tasks", b"new", {})
    assert (await bus.stats(a)).visible == 1, "the publish dropped what 'a' kept too long, unread"
    assert await bodies(bus, a) == [b"new"]
    assert await bodies(bus, b) == [b"new"]
    assert await bodies(bus, dlq_name(b)) == [b"old-1", b"old-2"], "a dead letter is kept 14 days"


# Not on aws: SQS's retention is 60 s at least (the test above checks the attributes it gets).
@pytest.mark.parametrize("bus_factory", ["sqlite", "redis"], indirect=True)
async def test_retention_counts_from_the_first_send_whatever_happened_since(bus: Bus, ns: str) -> None:
    """SQS keeps a message its retention from its first enqueue, however often it was received
    and given back since (a dead letter too: moved, it keeps that time). A message given back, or
    delayed, after its retention is gone: it is not delivered again."""
    q = f"{ns}-a"
    await bus.ensure(topology(ns, {"a": None}, retention_s=1.0, max_receives=5))
    for body in (b"released", b"delayed", b"taken-again"):
        await bus.publish(f"{ns}-tasks", body, {})
    got = {d.body: d for d in await bus.receive(q, max_messages=10, lease_s=0.3)}
    assert set(got) == {b"released", b"delayed", b"taken-again"}
    await asyncio.sleep(1.2)  # past the retention, all three held or given back since
    await bus.release(got[b"released"])
    await bus.release(got[b"delayed"], 0.1)
    await asyncio.sleep(0.2)
    assert await bus.receive(q, max_messages=10) == [], "kept past its retention"
    assert (await bus.stats(q)).visible == 0
    await bus.publish(f"{ns}-tasks", b"new", {})
    assert await bodies(bus, q) == [b"new"]


def ns_prefix(url: str) -> str:
    """The ``prefix`` of an ``aws://?prefix=…`` URL."""
    return dict(parse_qsl(urlsplit(url).query))["prefix"]
