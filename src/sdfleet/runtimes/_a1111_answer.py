"""SD WebUI's answers to generation and extras calls → a ``RuntimeResult``."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

from sdfleet.errors import RuntimeFailure
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.tasks import TaskType

_GENERATE = (TaskType.TEXT_TO_IMAGE, TaskType.IMAGE_TO_IMAGE)


def info_of(data: Any) -> dict[str, Any]:
    """The ``info`` JSON of a txt2img/img2img answer (``{}`` for anything else)."""
    if isinstance(data, dict) and isinstance(data.get("info"), str):
        with contextlib.suppress(ValueError):
            info = json.loads(data["info"])
            if isinstance(info, dict):
                return info
    return {}


def timestamp_of(data: Any) -> str | None:
    """SD WebUI's ``job_timestamp`` of the job that answered."""
    stamp = info_of(data).get("job_timestamp")
    return str(stamp) if stamp else None


def result_of(job: Job, data: Any, model: str | None) -> RuntimeResult:
    """Images and info of an answer; ``RuntimeFailure`` when it has fewer images than the job makes
    (SD WebUI stops an interrupted batch of extras early)."""
    if not isinstance(data, dict):
        raise RuntimeFailure(f"unexpected SD WebUI answer: {str(data)[:200]}")
    encoded = data.get("images") or ([data["image"]] if data.get("image") else [])
    expected = len(job.init_images) if job.type is TaskType.EXTRA_BATCH_IMAGES else 1
    if len(encoded) < expected:
        raise RuntimeFailure(f"SD WebUI returned {len(encoded)} image(s), expected {expected} (interrupted?)")
    images = [base64.b64decode(i.split(",", 1)[-1]) for i in encoded]
    info = info_of(data) or ({"html_info": data["html_info"]} if "html_info" in data else {})
    info["runtime"] = "a1111"
    seed = info.get("seed") if job.type in _GENERATE else None
    return RuntimeResult(images=images, info=info, seed=seed, model=model)
