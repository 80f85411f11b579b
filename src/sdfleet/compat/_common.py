"""What both seed formats share: task types, the A1111 payload → ``TaskParams`` mapping, output
prefixes and the result notification."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from sdfleet.errors import ValidationFailed, validation_errors, worded
from sdfleet.tasks import GENERATE, TASK_ID_PATTERN, TaskParams, TaskRecord, TaskState, TaskType

SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}"
PREFIX_WORDS = "folders of letters, digits, '.', '_' and '-' separated by '/' (not '.' or '..')"
PREFIX_PATTERN = worded(rf"^(/?({SEGMENT}/)*{SEGMENT}/?)?$", PREFIX_WORDS)
"""A ``save_dir`` or ``prefix``: folders of letters, digits, ``.``, ``_``, ``-`` (never ``.`` or
``..``), one leading and one trailing ``/`` allowed, as the seed's clients write them."""
MAX_INT_ID = 2**63 - 1
"""Largest integer accepted as a task id (``id_task``, ``metadata.id``)."""
_PREFIX = re.compile(PREFIX_PATTERN)
_TASK_ID = re.compile(TASK_ID_PATTERN)

# The seed's queue agent dispatches on these names; "extra-batch-image" is the spelling its
# sdwebui handler matches, "extra-batch-images" the A1111 endpoint's.
TASK_TYPES: dict[str, TaskType] = {
    "text-to-image": TaskType.TEXT_TO_IMAGE,
    "image-to-image": TaskType.IMAGE_TO_IMAGE,
    "extra-single-image": TaskType.EXTRA_SINGLE_IMAGE,
    "extra-batch-images": TaskType.EXTRA_BATCH_IMAGES,
    "extra-batch-image": TaskType.EXTRA_BATCH_IMAGES,
    "pipeline": TaskType.PIPELINE,
}

# Keys of ``alwayson_scripts`` that route the task in the seed and are not A1111 scripts.
ROUTING_KEYS = frozenset(
    {"task", "id_task", "uid", "sd_model_checkpoint", "image_link", "save_dir", "sd_vae", "override_settings"}
)

# A1111 request fields that map one to one onto ``TaskParams``.
_DIRECT = (
    "prompt",
    "negative_prompt",
    "steps",
    "width",
    "height",
    "cfg_scale",
    "seed",
    "batch_size",
    "denoising_strength",
)


def a1111_fields(p: TaskParams) -> dict[str, Any]:
    """The generation fields of an SD WebUI txt2img/img2img request, from ``p`` (the inverse of
    ``_DIRECT``, without the img2img-only ``denoising_strength``)."""
    body: dict[str, Any] = {
        "prompt": p.prompt,
        "negative_prompt": p.negative_prompt,
        "steps": p.steps,
        "width": p.width,
        "height": p.height,
        "cfg_scale": p.cfg_scale,
        "seed": p.seed,
        "batch_size": p.batch_size,
    }
    if p.sampler:
        body["sampler_name"] = p.sampler
    return body


def task_type(name: object, allowed: frozenset[TaskType] | None = None) -> TaskType:
    if not isinstance(name, str) or name not in TASK_TYPES:
        known = ", ".join(sorted(TASK_TYPES))
        raise ValidationFailed(f"unknown task type {name!r}; expected one of: {known}")
    kind = TASK_TYPES[name]
    if allowed is not None and kind not in allowed:
        raise ValidationFailed(f"task type {name!r} is not accepted by this API version")
    return kind


def task_id(value: object, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValidationFailed(f"{field} must be a string")
    if isinstance(value, int) and not 0 <= value <= MAX_INT_ID:
        raise ValidationFailed(f"invalid {field} {value}: a number id must be between 0 and {MAX_INT_ID}")
    text = str(value)
    if not _TASK_ID.fullmatch(text):
        raise ValidationFailed(
            f"invalid {field} {text[:140]!r}: use 1-128 letters, digits, '.', '_', ':' or '-',"
            " starting with a letter, a digit or '_'"
        )
    return text


def output_prefix(prefix: object, default: str | None, tenant: str) -> str:
    """The folder the seed writes a task's results under, less the ``/<id>`` the agent appends.

    The seed's agent strips one trailing ``/`` (a leading one is dropped too); anything that could
    make keys escape or collide (``..``, empty folders, backslashes) is refused (``PREFIX_PATTERN``).
    """
    if prefix is None or prefix == "":
        return default.strip("/") if default and default.strip("/") else tenant
    if not isinstance(prefix, str):
        raise ValidationFailed("prefix must be a string")
    if not _PREFIX.fullmatch(prefix):
        raise ValidationFailed(f"invalid prefix {prefix[:140]!r}: {PREFIX_WORDS}")
    return prefix.strip("/")


def _images_of(kind: TaskType, content: Mapping[str, Any]) -> tuple[list[str], set[str]]:
    """Input images and the content keys they came from."""
    if kind is TaskType.EXTRA_SINGLE_IMAGE and isinstance(content.get("image"), str):
        return [content["image"]], {"image"}
    if kind is TaskType.EXTRA_BATCH_IMAGES and isinstance(content.get("imageList"), list):
        items = content["imageList"]
        return [i["data"] for i in items if isinstance(i, dict) and isinstance(i.get("data"), str)], {
            "imageList"
        }
    images = content.get("init_images")
    if isinstance(images, list) and all(isinstance(i, str) for i in images):
        return list(images), {"init_images"}
    if images is not None:
        raise ValidationFailed("init_images must be a list of image URLs or base64 strings")
    return [], set()


def _scripts_and_overrides(scripts: Mapping[str, Any], content: Mapping[str, Any]) -> dict[str, Any]:
    """``alwayson_scripts`` less the seed's routing keys, and ``override_settings`` merged the way the
    seed's agent merges them (the ones given in ``alwayson_scripts`` win). Like the seed's agent
    since 1.0, ``uid`` and ``sd_vae`` are dropped."""
    extra: dict[str, Any] = {}
    rest = {k: v for k, v in scripts.items() if k not in ROUTING_KEYS}
    if rest:
        extra["alwayson_scripts"] = rest
    overrides: dict[str, Any] = {}
    if isinstance(content.get("override_settings"), dict):
        overrides.update(content["override_settings"])
    if isinstance(scripts.get("override_settings"), dict):
        overrides.update(scripts["override_settings"])
    if overrides:
        extra["override_settings"] = overrides
    return extra


def params_from_a1111(kind: TaskType, content: Mapping[str, Any]) -> TaskParams:
    """Map an A1111 request body onto ``TaskParams``; unknown keys go to ``extra`` unchanged.

    For image-to-image, ``alwayson_scripts.image_link`` replaces ``init_images``, as in the seed.
    """
    if kind is TaskType.PIPELINE:
        return _validated({"workflow": dict(content)})
    scripts = content.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise ValidationFailed("alwayson_scripts must be an object")
    found, used = _images_of(kind, content)
    fields: dict[str, Any] = {k: content[k] for k in _DIRECT if content.get(k) is not None}
    used |= set(_DIRECT) | {"sampler_name", "sampler_index", "alwayson_scripts", "override_settings"}
    sampler = content.get("sampler_name") or content.get("sampler_index")
    if sampler is None and kind in GENERATE:
        sampler = "Euler"  # SD WebUI's API default (its sampler_index), not the model's own scheduler
    if sampler is not None:
        fields["sampler"] = sampler
    if kind is TaskType.EXTRA_SINGLE_IMAGE or kind is TaskType.EXTRA_BATCH_IMAGES:
        fields.update(_upscale_fields(content))
        used |= {"upscaler_1", "upscaling_resize"}
    extra = _scripts_and_overrides(scripts, content)
    clip = extra.get("override_settings", {}).get("CLIP_stop_at_last_layers")
    if isinstance(clip, int) and not isinstance(clip, bool):
        fields["clip_skip"] = clip
    # The seed's agent never forwards its own bookkeeping key to the runtime.
    extra.update({k: v for k, v in content.items() if k not in used and k != "s3_output_path"})
    link = scripts.get("image_link")
    fields["init_images"] = [link] if kind is TaskType.IMAGE_TO_IMAGE and isinstance(link, str) else found
    fields["extra"] = extra
    return _validated(fields)


def _upscale_fields(content: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(content.get("upscaler_1"), str):
        out["upscaler"] = content["upscaler_1"]
    if content.get("upscaling_resize") is not None:
        out["upscaling_resize"] = content["upscaling_resize"]
    return out


def _validated(fields: dict[str, Any]) -> TaskParams:
    try:
        return TaskParams.model_validate(fields)
    except ValidationError as e:
        raise ValidationFailed(f"invalid {validation_errors(e, whole='payload')}") from e


def check_inputs(kind: TaskType, params: TaskParams) -> None:
    """What each task type cannot run without."""
    if kind is TaskType.TEXT_TO_IMAGE and not params.prompt.strip():
        raise ValidationFailed("text-to-image needs a non-empty prompt")
    if kind is TaskType.IMAGE_TO_IMAGE and not params.init_images:
        raise ValidationFailed("image-to-image needs an input image (image_link or init_images)")
    if kind is TaskType.EXTRA_SINGLE_IMAGE and not params.init_images:
        raise ValidationFailed("extra-single-image needs an input image (image)")
    if kind is TaskType.EXTRA_BATCH_IMAGES and not params.init_images:
        raise ValidationFailed("extra-batch-images needs input images (imageList)")
    if kind is TaskType.PIPELINE and not params.workflow:
        raise ValidationFailed("pipeline needs a ComfyUI workflow as content")


def notification(
    record: TaskRecord, runtime: str, image_urls: list[str], output_url: str | None
) -> dict[str, Any]:
    """The seed agent's result message: the same for both API versions."""
    ok = record.state is TaskState.SUCCEEDED
    return {
        "runtime": runtime,
        "id": record.id,
        "result": ok,
        "status": "completed" if ok else "failed",
        "image_url": list(image_urls) if ok else [],
        "output_url": output_url,
        "context": record.task.context,
    }


def running_notification(record: TaskRecord, runtime: str) -> dict[str, Any]:
    """What the seed's agent sends when a task starts (only with ``EXP_CALLBACK_WHEN_RUNNING``)."""
    return {"runtime": runtime, "id": record.id, "status": "running", "context": record.task.context}


M = TypeVar("M", bound=BaseModel)


def validate_seed(
    model: type[M], data: dict[str, Any], section: object, section_name: str, keys: tuple[str, ...]
) -> M:
    """Validate a seed body the way the seed's Lambda words its refusals: the routing keys it
    needs first (``Incorrect payload structure, X is missing``), then the model's own checks."""
    if not isinstance(section, dict):
        raise ValidationFailed(f"Incorrect payload structure, {section_name} is missing")
    for key in keys:
        if key not in section:
            raise ValidationFailed(f"Incorrect payload structure, {key} is missing")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ValidationFailed(f"Incorrect payload structure, {validation_errors(e, whole='payload')}") from e
