"""The seed's ``POST /v1alpha1/``: an AUTOMATIC1111 request body whose ``alwayson_scripts`` also
carries the routing keys.

```json
{"alwayson_scripts": {"task": "text-to-image", "sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors",
                      "id_task": "test-t2i", "save_dir": "outputs"},
 "prompt": "A dog", "steps": 16, "width": 512, "height": 512}
```

``image_link`` (image-to-image) becomes the first input image; ``uid`` and ``sd_vae`` are dropped
and ``override_settings`` is merged into the A1111 ``override_settings``, as the seed's agent does;
other keys of ``alwayson_scripts`` are
real A1111 scripts (ControlNet, AnimateDiff) and pass through in ``params.extra``. The seed routes
on the message attribute ``sd_model_checkpoint`` and answers
``{"id_task", "sd_model_checkpoint", "output_location"}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from sdfleet.compat import _common
from sdfleet.tasks import Origin, Task, TaskRecord, TaskType

ACCEPTED_TYPES = frozenset(
    {
        TaskType.TEXT_TO_IMAGE,
        TaskType.IMAGE_TO_IMAGE,
        TaskType.EXTRA_SINGLE_IMAGE,
        TaskType.EXTRA_BATCH_IMAGES,
    }
)
LEGACY_RUNTIME = "legacy"
"""What the seed's v1alpha1 Lambda writes as ``metadata.runtime`` when it wraps a request."""


class AlwaysOnScripts(BaseModel):
    """The seed's routing keys; A1111 scripts (``controlnet``…) are kept as extra fields."""

    model_config = ConfigDict(extra="allow")

    task: str
    sd_model_checkpoint: str
    id_task: str | int
    save_dir: str | None = None
    image_link: str | None = None
    uid: str | int | None = None
    sd_vae: str | None = None
    override_settings: dict[str, Any] | None = None


class Request(BaseModel):
    """A v1alpha1 body: the A1111 fields stay as extra fields."""

    model_config = ConfigDict(extra="allow")

    alwayson_scripts: AlwaysOnScripts


def _parse(body: dict[str, Any]) -> Request:
    keys = ("task", "sd_model_checkpoint", "id_task")
    return _common.validate_seed(Request, body, body.get("alwayson_scripts"), "alwayson_scripts", keys)


def to_task(
    body: dict[str, Any],
    *,
    tenant: str = "default",
    default_bucket_prefix: str | None = None,
    prefix: str | None = None,
    context: Any = None,
) -> Task:
    """A v1alpha1 request body → ``Task`` (origin v1alpha1). Raises ``ValidationFailed``.

    Results go under ``<save_dir>/<id_task>/`` like the seed's; without ``save_dir`` under
    ``default_bucket_prefix`` or else the tenant's name. ``prefix``/``context`` override
    ``save_dir`` and the empty context (used for messages the seed's Lambda already wrapped).
    """
    req = _parse(body)
    scripts = req.alwayson_scripts
    kind = _common.task_type(scripts.task, ACCEPTED_TYPES)
    params = _common.params_from_a1111(kind, body)
    _common.check_inputs(kind, params)
    return Task(
        id=_common.task_id(scripts.id_task, "id_task"),
        tenant=tenant,
        type=kind,
        model=scripts.sd_model_checkpoint or None,
        params=params,
        context={} if context is None else context,
        origin=Origin.V1ALPHA1,
        output_prefix=_common.output_prefix(
            prefix if prefix is not None else scripts.save_dir, default_bucket_prefix, tenant
        ),
    )


def attributes(task: Task) -> dict[str, str]:
    """The message attributes the seed's Lambda publishes with a v1alpha1 task (its routing key)."""
    return {"sd_model_checkpoint": task.model or ""}


def answer(task: Task, output_location: str) -> dict[str, Any]:
    """The seed's HTTP 200 body for ``POST /v1alpha1/``."""
    return {"id_task": task.id, "sd_model_checkpoint": task.model, "output_location": output_location}


def notification(record: TaskRecord, image_urls: list[str], output_url: str | None) -> dict[str, Any]:
    """The seed's result notification. ``runtime`` names what ran it: the queue, else the runtime."""
    runtime = record.task.queue or record.runtime or LEGACY_RUNTIME
    return _common.notification(record, runtime, image_urls, output_url)
