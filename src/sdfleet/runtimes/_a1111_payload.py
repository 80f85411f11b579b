"""Request bodies the a1111 runtime sends to SD WebUI, built from a ``Job``."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

from sdfleet.compat._common import ROUTING_KEYS, a1111_fields
from sdfleet.runtimes.base import Job
from sdfleet.tasks import TaskType

ENDPOINTS = {
    TaskType.TEXT_TO_IMAGE: "txt2img",
    TaskType.IMAGE_TO_IMAGE: "img2img",
    TaskType.EXTRA_SINGLE_IMAGE: "extra-single-image",
    TaskType.EXTRA_BATCH_IMAGES: "extra-batch-images",
}
_EXTRAS = (TaskType.EXTRA_SINGLE_IMAGE, TaskType.EXTRA_BATCH_IMAGES)
# Keys a job may carry in ``extra`` that SD WebUI must not see.
_NEVER_SENT = frozenset({"scheduler_hint", "s3_output_path"})
# Keys of ``extra`` that the built body already carries, merged.
_BUILT_FROM_EXTRA = frozenset(
    {"alwayson_scripts", "override_settings", "override_settings_restore_afterwards"}
)
CLIP_SKIP = "CLIP_stop_at_last_layers"

Fetch = Callable[[str], Awaitable[bytes]]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _generation_body(job: Job) -> dict[str, Any]:
    p = job.params
    body = a1111_fields(p)
    # Every setting the job depends on goes with it, every time, and SD WebUI puts it back after
    # the job: a setting left behind by one job must not change the next (clip skip 1 included).
    overrides = dict(p.extra.get("override_settings") or {})
    overrides[CLIP_SKIP] = p.clip_skip
    body["override_settings"] = overrides
    body["override_settings_restore_afterwards"] = True
    scripts = p.extra.get("alwayson_scripts") or {}
    body["alwayson_scripts"] = {k: v for k, v in scripts.items() if k not in ROUTING_KEYS}
    if job.type is TaskType.IMAGE_TO_IMAGE:
        body["init_images"] = [b64(i) for i in job.init_images]
        if job.mask is not None:  # fetched by the agent (a URL, s3:// or base64 in the task)
            body["mask"] = b64(job.mask)
        body["denoising_strength"] = p.denoising_strength
    return body


def _extras_body(job: Job) -> dict[str, Any]:
    """What the task says, no more: SD WebUI's defaults (upscaler "None") leave the image as it is."""
    p = job.params
    body: dict[str, Any] = {"upscaling_resize": p.upscaling_resize}
    if p.upscaler:
        body["upscaler_1"] = p.upscaler
    if job.type is TaskType.EXTRA_SINGLE_IMAGE:
        body["image"] = b64(job.init_images[0]) if job.init_images else ""
    else:
        body["imageList"] = [
            {"data": b64(data), "name": f"image{n:05}"} for n, data in enumerate(job.init_images, 1)
        ]
    return body


def build_body(job: Job) -> dict[str, Any]:
    """The A1111 body for ``job``: known params, then the job's own A1111 keys from ``extra``.

    The seed's routing-only ``alwayson_scripts`` keys are stripped; ``extra`` never overrides a
    field built from the job (its images, prompt, seed …).
    """
    built = _extras_body(job) if job.type in _EXTRAS else _generation_body(job)
    passthrough = {
        k: v
        for k, v in job.params.extra.items()
        if k not in built and k not in _NEVER_SENT and k not in _BUILT_FROM_EXTRA
    }
    return {**passthrough, **built}


def _is_url(value: str) -> bool:
    return value[:8].lower().startswith(("http://", "https://"))


async def inline_urls(value: Any, fetch: Fetch) -> Any:
    """``value`` with every http(s) URL string, at any depth, replaced by the base64 of its image."""
    if isinstance(value, str):
        return b64(await fetch(value)) if _is_url(value) else value
    if isinstance(value, list):
        return [await inline_urls(v, fetch) for v in value]
    if isinstance(value, dict):
        return {k: await inline_urls(v, fetch) for k, v in value.items()}
    return value
