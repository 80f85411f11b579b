"""Message body → Task, for every form an agent may find on its queue (the agent reads each
delivery with it; ``sdfleet dlq`` reads dead letters with it)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from sdfleet import jsonsafe
from sdfleet.bus.base import Delivery
from sdfleet.compat import sns
from sdfleet.errors import MessageDecodeError, ValidationFailed
from sdfleet.tasks import Task


def decode_task(body: bytes, attributes: Mapping[str, str]) -> Task:
    """Our own ``Task`` JSON, or — so an sdfleet agent can drain a seed deployment's queue — the
    seed's messages, raw or inside an SNS envelope (RawMessageDelivery off)."""
    return _decode_inner(*sns.unwrap(body, attributes))[0]


@dataclass(frozen=True)
class Decoded:
    """A delivery's message, read once: its task, where it comes from, and the attributes it
    carries (inside its SNS envelope, if any)."""

    task: Task
    ours: bool
    """Whether the message is sdfleet's own ``Task`` JSON (False: a seed message, whose runs the
    message does not number, see ``Task.run``)."""
    publish: str
    """The publish the delivery comes from, the same on each redelivery: SNS's ``MessageId``
    inside an envelope (also the same on every queue the publish fanned out to), else the bus's
    message id (sqlite and redis: the publish's; SQS with raw delivery: this queue's copy's)."""
    attributes: dict[str, str]


def decode_delivery(d: Delivery) -> Decoded:
    """A received delivery's message (``decode_task``), where it comes from and its attributes."""
    opened = sns.open_envelope(d.body, d.attributes)
    task, ours = _decode_inner(opened.body, opened.attributes)
    return Decoded(task, ours, opened.publish_id or d.message_id, opened.attributes)


def _decode_inner(inner: bytes, attrs: Mapping[str, str]) -> tuple[Task, bool]:
    try:
        data = jsonsafe.loads(inner)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MessageDecodeError(f"body is not JSON: {e}") from e
    except jsonsafe.JsonTooDeep as e:
        raise MessageDecodeError(e.message) from e
    if isinstance(data, dict) and data.get("schema") == 1 and "params" in data:
        try:
            return Task.model_validate(data), True
        except ValidationError as e:
            raise MessageDecodeError(f"not a valid task: {e}") from e
    try:
        return sns.seed_data_to_task(data, attrs), False
    except ValidationFailed as e:
        raise MessageDecodeError(f"neither an sdfleet task nor a seed message: {e}") from e
