"""SNS envelopes, and the messages the seed's input Lambdas publish.

An SQS queue subscribed to a topic without RawMessageDelivery (the seed's CDK leaves it off)
receives each message wrapped in a JSON envelope:

```json
{"Type": "Notification", "MessageId": "…", "TopicArn": "arn:aws:sns:…", "Message": "<the body>",
 "Timestamp": "…", "SignatureVersion": "1", "Signature": "…", "SigningCertURL": "…",
 "UnsubscribeURL": "…", "MessageAttributes": {"runtime": {"Type": "String", "Value": "sdruntime"}}}
```

The seed's Lambdas publish:

- v1alpha1 (1.0 and later): ``{"metadata": {"id": id_task, "runtime": "legacy", "tasktype": task,
  "prefix": save_dir, "context": {}}, "content": <the request, plus "s3_output_path">}`` with the
  attribute ``sd_model_checkpoint``;
- v1alpha1 (before 1.0): the request itself plus ``s3_output_path``, same attribute;
- v1alpha2: the request's ``task`` member, ``{"metadata": …, "content": …}``, with the attribute
  ``runtime``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

from sdfleet import jsonsafe
from sdfleet.compat import v1alpha1, v1alpha2
from sdfleet.errors import ValidationFailed
from sdfleet.tasks import Task


def _envelope(body: bytes) -> dict[str, Any] | None:
    # SNS writes its keys plainly: a body without one is not parsed here, only by its reader.
    if not body.lstrip().startswith(b"{") or b'"TopicArn"' not in body:
        return None
    try:
        data = jsonsafe.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, jsonsafe.JsonTooDeep):
        return None
    if (
        isinstance(data, dict)
        and data.get("Type") == "Notification"
        and isinstance(data.get("Message"), str)
        and isinstance(data.get("TopicArn"), str)
    ):
        return data
    return None


class Opened(NamedTuple):
    """A message out of its envelope (``open_envelope``)."""

    body: bytes
    attributes: dict[str, str]
    publish_id: str | None
    """The SNS ``MessageId``: one per publish, the same on every queue the publish fanned out to
    and on every redelivery; None for a body that is not an envelope."""


def open_envelope(body: bytes, attributes: Mapping[str, str]) -> Opened:
    """The inner message, its attributes and its publish if ``body`` is an SNS notification
    envelope (attributes from the envelope win over the outer ones); else ``body`` and
    ``attributes`` unchanged. The envelope is parsed once."""
    env = _envelope(body)
    if env is None:
        return Opened(body, dict(attributes), None)
    attrs = dict(attributes)
    raw = env.get("MessageAttributes")
    if isinstance(raw, dict):
        for name, attr in raw.items():
            if isinstance(attr, dict) and isinstance(attr.get("Value"), str):
                attrs[name] = attr["Value"]
    mid = env.get("MessageId")
    return Opened(str(env["Message"]).encode(), attrs, mid if isinstance(mid, str) and mid else None)


def unwrap(body: bytes, attributes: Mapping[str, str]) -> tuple[bytes, dict[str, str]]:
    """``open_envelope`` without the publish: the inner message and its attributes."""
    opened = open_envelope(body, attributes)
    return opened.body, opened.attributes


def seed_message_to_task(
    body: bytes,
    attributes: Mapping[str, str],
    *,
    tenant: str = "default",
    default_bucket_prefix: str | None = None,
) -> Task:
    """A message exactly as the seed's v1alpha1/v1alpha2 Lambda publishes it (raw or in an SNS
    envelope) → ``Task``, so an sdfleet agent can drain a seed deployment's queue.

    Raises ``ValidationFailed`` when the message is none of the seed's forms or its content is
    invalid.
    """
    inner, attrs = unwrap(body, attributes)
    try:
        data = jsonsafe.loads(inner)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValidationFailed(f"message is not JSON: {e}") from e
    return seed_data_to_task(data, attrs, tenant=tenant, default_bucket_prefix=default_bucket_prefix)


def seed_data_to_task(
    data: object,
    attrs: Mapping[str, str],
    *,
    tenant: str = "default",
    default_bucket_prefix: str | None = None,
) -> Task:
    """``seed_message_to_task`` for a message already out of its envelope and parsed."""
    if not isinstance(data, dict):
        raise ValidationFailed("message is not a JSON object")
    opts: dict[str, Any] = {"tenant": tenant, "default_bucket_prefix": default_bucket_prefix}
    if isinstance(data.get("metadata"), dict) and "content" in data:
        meta, content = data["metadata"], data["content"]
        if meta.get("runtime") == v1alpha1.LEGACY_RUNTIME and isinstance(content, dict):
            if "alwayson_scripts" in content:
                return _wrapped_v1alpha1(meta, content, attrs, opts)
        return v1alpha2.task_from_inner(data, **opts)
    if isinstance(data.get("alwayson_scripts"), dict):
        return _checkpoint_from_attribute(v1alpha1.to_task(data, **opts), attrs)
    raise ValidationFailed("not a seed message: expected {metadata, content} or an A1111 payload")


def _wrapped_v1alpha1(
    meta: dict[str, Any], content: dict[str, Any], attrs: Mapping[str, str], opts: dict[str, Any]
) -> Task:
    prefix = meta.get("prefix")
    task = v1alpha1.to_task(
        content,
        prefix=prefix if isinstance(prefix, str) else None,
        context=meta.get("context", {}),
        **opts,
    )
    return _checkpoint_from_attribute(task, attrs)


def _checkpoint_from_attribute(task: Task, attrs: Mapping[str, str]) -> Task:
    # The routing attribute is what put the message on this queue; the body may omit the model.
    if task.model is None and attrs.get("sd_model_checkpoint"):
        return task.model_copy(update={"model": attrs["sd_model_checkpoint"]})
    return task
