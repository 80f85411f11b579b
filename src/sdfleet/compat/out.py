"""The seed's ``.out`` JSON for tasks that came in through its formats (``sdwebui.py``: ``succeed`` and
``failed``). A backend built for the seed reads ``parameters``: ``id_task``, ``image_seed`` (the
seeds, comma-separated) and ``error_msg`` (empty on success); on failure ``status`` 0 and
``reason``. sdfleet's own keys (the runtime's info, the image locations, ``task_id``) stay beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdfleet.compat._common import a1111_fields
from sdfleet.tasks import Origin, Task, TaskType

SEED_ORIGINS = (Origin.V1ALPHA1, Origin.V1ALPHA2)


def _request(task: Task) -> dict[str, Any]:
    """The request as SD WebUI's answer echoes it in ``parameters`` (its A1111 field names)."""
    p = task.params
    fields = a1111_fields(p)
    if task.type is TaskType.IMAGE_TO_IMAGE:
        fields["denoising_strength"] = p.denoising_strength
    return {**fields, **p.extra}


def succeeded_out(task: Task, info: Mapping[str, Any], seed: int | None, images: int) -> dict[str, Any]:
    """``parameters`` of a finished task's ``.out``: what the seed's ``succeed`` writes."""
    if task.type in (TaskType.EXTRA_SINGLE_IMAGE, TaskType.EXTRA_BATCH_IMAGES):
        return {"html_info": info.get("html_info", ""), "id_task": task.id, "error_msg": ""}
    seeds = info.get("all_seeds")
    if not isinstance(seeds, list):
        seeds = [seed + n for n in range(images)] if seed is not None else []
    return {
        **_request(task),
        "id_task": task.id,
        "image_seed": ",".join(str(s) for s in seeds),
        "error_msg": "",
    }


def failed_out(task: Task, code: str, message: str) -> dict[str, Any]:
    """A failed task's whole ``.out``: what the seed's ``failed`` writes, with sdfleet's reason."""
    return {
        "images": [""],
        "parameters": {
            "id_task": task.id,
            "status": 0,
            "error_msg": message,
            "reason": {"code": code, "message": message},
        },
        "info": "",
        "task_id": task.id,
    }
