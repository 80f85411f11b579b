"""Differential test: ``sdfleet.policy.matches`` against real SNS → SQS routing (moto server mode).

Every policy below becomes one SQS queue subscribed to a topic with that filter policy; every
message is published once, with typed SNS attributes (``String``, ``Number``, ``String.Array``) or
a JSON body; then each queue holds exactly the messages SNS routed to it. For every (policy,
message) pair, SNS's answer and ``policy.matches`` must agree, except:

- ``MOTO_DEVIATIONS``: pairs where moto departs from the behaviour the Amazon SNS developer guide
  documents. There ``policy.matches`` must give the documented answer AND moto must still give the
  other one, so the list shrinks as moto is fixed (and a wrong entry fails);
- ``SDFLEET_DIFFERENCES``: the one documented, deliberate difference of ``policy.py`` (a numeric
  condition also matches a ``String`` attribute that reads as a number, because the sdfleet buses
  publish attributes as strings but ``priority``). On AWS, SNS does not: see docs/aws.md.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from sdfleet.bus import QueueSpec, Subscription, Topology
from sdfleet.bus.backends.aws import AwsBus
from sdfleet.errors import ValidationFailed
from sdfleet.policy import matches

ERROR = "moto error"
Outcome = bool | str

# -- attribute scope -----------------------------------------------------------------------------

ATTR_POLICIES: dict[str, dict[str, Any]] = {
    "exact": {"model": ["sd15.safetensors"]},
    "exact-or": {"model": ["sd15.safetensors", "sdxl.safetensors"]},
    "and": {"model": ["sd15.safetensors"], "tier": ["paid"]},
    "anything-but-list": {"model": [{"anything-but": ["sd15.safetensors"]}]},
    "anything-but-one": {"model": [{"anything-but": "sd15.safetensors"}]},
    "anything-but-prefix": {"model": [{"anything-but": {"prefix": "sd"}}]},
    "prefix": {"model": [{"prefix": "sd"}]},
    "suffix": {"model": [{"suffix": ".safetensors"}]},
    "ignore-case": {"model": [{"equals-ignore-case": "sd15.safetensors"}]},
    "exists": {"tier": [{"exists": True}]},
    "not-exists": {"tier": [{"exists": False}]},
    "not-exists-and": {"model": [{"exists": False}], "tier": ["paid"]},
    "numeric-eq": {"n": [{"numeric": ["=", 5]}]},
    "numeric-range": {"n": [{"numeric": [">", 0, "<=", 150]}]},
    "numeric-neg": {"n": [{"numeric": ["<", 0]}]},
    "number-exact": {"n": [5]},
    "string-five": {"n": ["5"]},
    "anything-but-number": {"n": [{"anything-but": [5]}]},
    "array-member": {"tags": ["a"]},
    "array-anything-but": {"tags": [{"anything-but": ["a"]}]},
    "cidr": {"ip": [{"cidr": "10.0.0.0/24"}]},
    "or": {"$or": [{"tier": ["paid"]}, {"model": [{"prefix": "flux"}]}]},
    "mixed-values": {"model": ["sd15.safetensors", {"prefix": "flux"}]},
    "suffix-region": {"region": [{"suffix": "-1"}]},
    "two-keys-or-values": {"tier": ["paid", "enterprise"], "model": [{"exists": True}]},
    "prefix-or-exact": {"model": [{"prefix": "flux"}, "sd21-base"]},
    # what ``disjoint`` makes of priority lanes (``priority`` is published as a Number)
    "lane-rest": {"$or": [{"priority": [{"exists": False}]}, {"priority": [{"numeric": ["<", 5]}]}]},
    "lane-ranges": {"priority": [{"numeric": [">", 1, "<", 4]}, {"numeric": [">", 4]}]},
}

ATTR_MESSAGES: dict[str, dict[str, Any]] = {
    "none": {},
    "sd15-paid": {"model": "sd15.safetensors", "tier": "paid", "n": 5},
    "sdxl-free": {"model": "sdxl.safetensors", "tier": "free", "n": 150},
    "upper-eu": {"model": "SD15.SAFETENSORS", "region": "eu-west-1"},
    "paid-only": {"tier": "paid"},
    "flux-tags": {"model": "flux-dev", "tags": ["a", "b"], "n": -3.5},
    "ip-sd15": {"ip": "10.0.0.7", "model": "sd15.safetensors"},
    "string-n": {"model": "sd15.safetensors", "n": "5"},
    "enterprise-x": {"tags": ["x"], "tier": "enterprise"},
    "sd21-ip": {"model": "sd21-base", "ip": "192.168.1.1", "n": 0},
    "urgent": {"priority": 7, "tier": "paid"},
    "low": {"priority": 0, "model": "sd15.safetensors"},
    "four": {"priority": 4},
    "two-and-a-half": {"priority": 2.5},
}

# -- MessageBody scope ---------------------------------------------------------------------------

BODY_POLICIES: dict[str, dict[str, Any]] = {
    "b-flat": {"runtime": ["comfyui"]},
    "b-nested": {"task": {"runtime": ["comfyui"]}},
    "b-nested-anything-but": {"task": {"runtime": [{"anything-but": ["comfyui"]}]}},
    "b-numeric": {"task": {"steps": [{"numeric": [">=", 20]}]}},
    "b-deep": {"task": {"metadata": {"tenant": ["acme"]}}},
    "b-not-exists": {"task": {"webhook": [{"exists": False}]}},
    "b-exists": {"task": {"webhook": [{"exists": True}]}},
    "b-prefix": {"task": {"model": [{"prefix": "sd"}]}},
    "b-array": {"tags": ["gpu"]},
    "b-or": {"$or": [{"task": {"runtime": ["a1111"]}}, {"priority": [{"numeric": [">", 5]}]}]},
    "b-numeric-range": {"task": {"steps": [{"numeric": [">", 10, "<", 40]}]}},
    "b-bool": {"flag": [True]},
    "b-array-of-objects": {"items": {"kind": ["x"]}},
    "b-and": {"task": {"runtime": ["comfyui"], "steps": [30]}},
    "b-ignore-case": {"task": {"runtime": [{"equals-ignore-case": "COMFYUI"}]}},
    "b-suffix": {"task": {"model": [{"suffix": "15"}]}},
}

BODY_MESSAGES: dict[str, Any] = {
    "comfy": {"task": {"runtime": "comfyui", "steps": 30, "model": "sd15", "metadata": {"tenant": "acme"}}},
    "webui": {
        "task": {"runtime": "sdwebui", "steps": 10, "model": None, "webhook": "https://x"},
        "priority": 9,
    },
    "flat": {"runtime": "comfyui", "tags": ["gpu", "fast"], "flag": True},
    "a1111": {
        "task": {"runtime": "a1111", "steps": 20, "model": "flux"},
        "items": [{"kind": "y"}, {"kind": "x"}],
    },
    "other": {"other": 1},
    "upper": {"task": {"runtime": "ComfyUI", "steps": 50, "webhook": ""}},
    "array-body": [1, 2],
}

# (policy, message) → the result the SNS developer guide documents, where moto (5.2) gives the
# other one or fails. Pages: docs.aws.amazon.com/sns/latest/dg/<page>.html
MOTO_DEVIATIONS: dict[tuple[str, str], bool] = {
    # attribute-key-matching: '"exists": false only matches if at least one attribute is
    # present'; moto matches a message without attributes.
    ("not-exists", "none"): False,
    ("lane-rest", "none"): False,
    # string-value-matching: string values match strings; a Number attribute 5 is matched by
    # numeric conditions (numeric-value-matching), not by the string "5"; moto compares text.
    ("string-five", "sd15-paid"): False,
    # IP address matching ("cidr") is documented (and announced 2021-04); moto refuses the
    # policy at Subscribe ("Unrecognized match type cidr").
    **{("cidr", m): m == "ip-sd15" for m in ATTR_MESSAGES},
    # attribute-key-matching: exists works on leaf nodes; an absent leaf (here a missing parent
    # object) is "doesn't include the specified property"; moto does not match.
    ("b-not-exists", "flat"): True,
    ("b-not-exists", "other"): True,
    # attribute-key-matching: '"exists": true ... must have a non-null and non-empty value';
    # moto matches "". policy.py makes exists:false the complement (matches "").
    ("b-exists", "upper"): False,
    ("b-not-exists", "upper"): True,
    # prefix/suffix on a JSON null: no match (string operators match strings); moto answers
    # HTTP 500 (AttributeError in its matcher) and the publish fails.
    ("b-prefix", "webui"): False,
    ("b-suffix", "webui"): False,
    # and-or-logic, "$or" in MessageBody scope: moto crashes (KeyError 'Value') whenever the
    # body has the first branch's parent key.
    ("b-or", "comfy"): False,
    ("b-or", "webui"): True,
    ("b-or", "a1111"): True,
    ("b-or", "upper"): False,
    # string-value-matching, equals-ignore-case: moto ignores it in MessageBody scope (it
    # honours it for attributes).
    ("b-ignore-case", "comfy"): True,
    ("b-ignore-case", "upper"): True,
}

# (policy, message) → policy.py's deliberate answer, where SNS (on AWS and in moto) differs.
SDFLEET_DIFFERENCES: dict[tuple[str, str], bool] = {
    # A String attribute "5" against a numeric condition: policy.py reads it as a number because
    # the sdfleet buses publish every attribute as a string; SNS only compares Number attributes.
    ("numeric-eq", "string-n"): True,
    ("numeric-range", "string-n"): True,
}

assert len(ATTR_POLICIES) + len(BODY_POLICIES) >= 40


def _sns_attributes(attrs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, list):
            out[k] = {"DataType": "String.Array", "StringValue": json.dumps(v)}
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = {"DataType": "Number", "StringValue": str(v)}
        else:
            out[k] = {"DataType": "String", "StringValue": str(v)}
    return out


def _body_text(name: str, body: Any) -> str:
    # the message name travels in the body so each queue's contents identify the messages;
    # "_mid" is a key no policy mentions
    if isinstance(body, dict):
        return json.dumps({**body, "_mid": name})
    return json.dumps(body) + f" {name}"


def _routed(sqs: Any, url: str) -> Iterator[str]:
    while True:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=60).get(
            "Messages", []
        )
        if not got:
            return
        for m in got:
            yield m["Body"]


def _route_one(
    sns: Any, sqs: Any, arn: str, url: str, scope: str, messages: dict[str, Any]
) -> dict[str, Outcome]:
    out: dict[str, Outcome] = {}
    by_text: dict[str, str] = {}
    for name, msg in messages.items():
        try:
            if scope == "MessageAttributes":
                text = f"message {name}"
                sns.publish(TopicArn=arn, Message=text, MessageAttributes=_sns_attributes(msg))
            else:
                text = _body_text(name, msg)
                sns.publish(TopicArn=arn, Message=text)
        except (ClientError, BotoCoreError, ResponseParserError):  # moto failed on this pair
            out[name] = ERROR
            continue
        by_text[text] = name
        out[name] = False
    for body in _routed(sqs, url):
        out[by_text[body]] = True
    return out


async def _route_all(
    prefix: str, scope: str, policies: dict[str, Any], messages: dict[str, Any]
) -> dict[tuple[str, str], Outcome]:
    """One topic and queue per policy (a moto crash on one policy spoils no other); every message
    published to every topic; returns SNS's outcome per (policy, message)."""
    config = Config(retries={"max_attempts": 1})
    sns, sqs = boto3.client("sns", config=config), boto3.client("sqs", config=config)
    outcomes: dict[tuple[str, str], Outcome] = {}
    async with AwsBus(prefix, max_attempts=1) as bus:
        for p, policy in policies.items():
            sub = Subscription(topic=p, queue=p, filter_policy=policy, scope=scope)  # type: ignore[arg-type]
            try:
                await bus.ensure(Topology(topics=[p], queues=[QueueSpec(name=p)], subscriptions=[sub]))
            except ValidationFailed:  # moto refused the policy itself
                outcomes.update({(p, m): ERROR for m in messages})
                continue
            arn = sns.create_topic(Name=f"{prefix}{p}")["TopicArn"]
            url = sqs.get_queue_url(QueueName=f"{prefix}{p}")["QueueUrl"]
            got = await asyncio.to_thread(_route_one, sns, sqs, arn, url, scope, messages)
            outcomes.update({(p, m): v for m, v in got.items()})
    return outcomes


def _policy_says(scope: str, policy: dict[str, Any], message: Any, name: str) -> bool:
    if scope == "MessageAttributes":
        return matches(policy, message, f"message {name}", scope="MessageAttributes")
    return matches(policy, {}, _body_text(name, message), scope="MessageBody")


@pytest.mark.parametrize(
    ("scope", "policies", "messages"),
    [("MessageAttributes", ATTR_POLICIES, ATTR_MESSAGES), ("MessageBody", BODY_POLICIES, BODY_MESSAGES)],
    ids=["attributes", "body"],
)
async def test_policy_engine_agrees_with_sns(
    moto_url: str, scope: str, policies: dict[str, Any], messages: dict[str, Any]
) -> None:
    routed = await _route_all(f"d{uuid.uuid4().hex[:8]}-", scope, policies, messages)
    disagreements = []
    for p, policy in policies.items():
        for m, message in messages.items():
            sns_says = routed[(p, m)]
            ours = _policy_says(scope, policy, message, m)
            if (p, m) in MOTO_DEVIATIONS:
                documented = MOTO_DEVIATIONS[(p, m)]
                assert ours == documented, f"policy.py departs from the SNS docs on {p} × {m}"
                assert sns_says != documented, f"moto now follows the docs on {p} × {m}: drop the entry"
            elif (p, m) in SDFLEET_DIFFERENCES:
                assert ours == SDFLEET_DIFFERENCES[(p, m)]
                assert sns_says != ours, f"SNS now agrees on {p} × {m}: drop the entry"
            elif sns_says != ours:
                disagreements.append(f"{p} × {m}: sns={sns_says} policy.py={ours}")
    assert not disagreements, "\n".join(disagreements)
    assert sum(v is True for v in routed.values()) >= 20, "SNS routed (almost) nothing"
