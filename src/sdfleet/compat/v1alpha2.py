"""The seed's ``POST /v1alpha2/``: task metadata beside a runtime-specific content.

```json
{"task": {"metadata": {"id": "test-t2i", "runtime": "sdruntime", "tasktype": "text-to-image",
                       "prefix": "output", "context": ""},
          "content": {"alwayson_scripts": {}, "prompt": "A dog", "steps": 16, "width": 512, "height": 512}}}
```

``content`` is the A1111 body for text/image-to-image and extras (the model, when the runtime
switches models, is ``content.alwayson_scripts.sd_model_checkpoint``) and a ComfyUI workflow for
``pipeline``. The seed routes on the message attribute ``runtime`` and answers
``{"id", "runtime", "output_location"}``; ``metadata.context`` is echoed in the notification.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sdfleet.compat import _common
from sdfleet.errors import ValidationFailed
from sdfleet.tasks import Origin, Task, TaskRecord, TaskType

_NO_CONTEXT: dict[str, Any] = {}


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | int
    runtime: str = Field(min_length=1)
    tasktype: str
    prefix: str | None = None
    context: Any = None


class TaskBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    metadata: Metadata
    content: dict[str, Any]


class Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    task: TaskBody


def _parse(task: dict[str, Any]) -> TaskBody:
    keys = ("id", "runtime", "tasktype")
    if isinstance(task.get("metadata"), dict) and all(k in task["metadata"] for k in keys):
        if "content" not in task:
            raise ValidationFailed("Incorrect payload structure, content is missing")
    return _common.validate_seed(TaskBody, task, task.get("metadata"), "metadata", keys)


def _model(content: dict[str, Any]) -> str | None:
    for holder in (content.get("alwayson_scripts"), content.get("override_settings")):
        if isinstance(holder, dict) and isinstance(holder.get("sd_model_checkpoint"), str):
            return holder["sd_model_checkpoint"] or None
    return None


def task_from_inner(
    inner: dict[str, Any], *, tenant: str = "default", default_bucket_prefix: str | None = None
) -> Task:
    """``{"metadata", "content"}``: the ``task`` member of a request, which is also exactly what the
    seed's v1alpha2 Lambda publishes."""
    body = _parse(inner)
    meta = body.metadata
    kind = _common.task_type(meta.tasktype)
    params = _common.params_from_a1111(kind, body.content)
    _common.check_inputs(kind, params)
    context = meta.context if "context" in meta.model_fields_set else _NO_CONTEXT.copy()
    return Task(
        id=_common.task_id(meta.id, "metadata.id"),
        tenant=tenant,
        type=kind,
        runtime=meta.runtime,
        model=None if kind is TaskType.PIPELINE else _model(body.content),
        params=params,
        context=context,
        origin=Origin.V1ALPHA2,
        output_prefix=_common.output_prefix(meta.prefix, default_bucket_prefix, tenant),
    )


def to_task(
    body: dict[str, Any], *, tenant: str = "default", default_bucket_prefix: str | None = None
) -> Task:
    """A v1alpha2 request body → ``Task`` (origin v1alpha2). Raises ``ValidationFailed``.

    ``metadata.runtime`` becomes ``Task.runtime`` (the seed's routing key); results go under
    ``<prefix>/<id>/`` like the seed's, without ``prefix`` under ``default_bucket_prefix`` or else
    the tenant's name.
    """
    inner = body.get("task")
    if not isinstance(inner, dict):
        raise ValidationFailed("Incorrect payload structure, task is missing")
    return task_from_inner(inner, tenant=tenant, default_bucket_prefix=default_bucket_prefix)


def attributes(task: Task) -> dict[str, str]:
    """The message attributes the seed's Lambda publishes with a v1alpha2 task (its routing key)."""
    return {"runtime": task.runtime or ""}


def answer(task: Task, output_location: str) -> dict[str, Any]:
    """The seed's HTTP 200 body for ``POST /v1alpha2/``."""
    return {"id": task.id, "runtime": task.runtime, "output_location": output_location}


def notification(record: TaskRecord, image_urls: list[str], output_url: str | None) -> dict[str, Any]:
    """The seed's result notification; ``runtime`` is the runtime name the client addressed."""
    runtime = record.task.runtime or record.task.queue or record.runtime or ""
    return _common.notification(record, runtime, image_urls, output_url)
