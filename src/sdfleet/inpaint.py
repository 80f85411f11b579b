"""SD WebUI's inpainting as an image-to-image task asks for it: a ``mask`` and the fields that say
what to do with it, read from ``params.extra`` (their SD WebUI 1.10 API names and defaults).
Torch-free: the API checks the values at the door; the diffusers runtime makes the masked images
(``runtimes/_inpaint_images.py``, ``runtimes/_diffusers_generate.py``).

White in the mask is repainted, black kept (``inpainting_mask_invert``: the other way round). The
mask is blurred (``mask_blur_x``/``mask_blur_y``, or ``mask_blur`` for both), then either the
whole image is repainted at the task's size or, with ``inpaint_full_res`` (SD WebUI's "Only
masked", its API's default), only the mask's bounding box widened by ``inpaint_full_res_padding``
pixels, brought to the task's size and pasted back into the input, which keeps its own size. What
starts the masked area: ``inpainting_fill`` 0 the surrounding colours blurred into it ("fill"),
1 the input ("original"), 2 noise and 3 nothing in its latents. ``mask_round`` (on) makes each
latent pixel repainted or kept. Outside the blurred mask the input is laid back over the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdfleet.errors import Reject
from sdfleet.tasks import TaskParams, TaskType

FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
"""SD WebUI's ``inpainting_fill`` values and their infotext words."""
BLUR_MAX = 256
"""Most pixels of mask blur (SD WebUI's slider stops at 64). The blur's kernel is 5 × blur wide."""
PADDING_MAX = 4096


@dataclass(frozen=True)
class Inpaint:
    """A task's inpainting, as ``read`` finds it."""

    blur_x: int
    blur_y: int
    invert: bool
    fill: int
    full_res: bool
    """SD WebUI's "Only masked": the mask's region, at the task's size, pasted back."""
    padding: int
    round: bool = True
    """SD WebUI's ``mask_round``: each latent pixel repainted or kept; off, grey ones are blended."""


def asked(kind: TaskType, params: TaskParams) -> bool:
    """Whether a ``kind`` task gives a mask (SD WebUI reads ``mask`` only for image-to-image)."""
    return kind is TaskType.IMAGE_TO_IMAGE and bool(params.extra.get("mask"))


def read(kind: TaskType, params: TaskParams) -> Inpaint | None:
    """The task's inpainting; None without a mask. ``Reject`` (``invalid_params``) for a mask that
    is no text (a URL, data URL or base64) and for values SD WebUI could not use."""
    if not asked(kind, params):
        return None
    extra = params.extra
    if not isinstance(extra["mask"], str):
        raise Reject("mask must be an image: a URL, a data URL or base64 text", code="invalid_params")
    if extra.get("mask_blur") is None:
        blur_x, blur_y = _count(extra, "mask_blur_x", 4, BLUR_MAX), _count(extra, "mask_blur_y", 4, BLUR_MAX)
    else:  # SD WebUI's setter: both at once
        blur_x = blur_y = _count(extra, "mask_blur", 4, BLUR_MAX)
    fill = _count(extra, "inpainting_fill", 0, 3)
    invert = _count(extra, "inpainting_mask_invert", 0, 1)
    full_res = _flag(extra, "inpaint_full_res")
    padding = _count(extra, "inpaint_full_res_padding", 0, PADDING_MAX)
    return Inpaint(blur_x, blur_y, bool(invert), fill, full_res, padding, _flag(extra, "mask_round"))


def _flag(extra: dict[str, Any], key: str) -> bool:
    value = extra.get(key, True)
    if value is None:
        return True
    if not isinstance(value, bool | int) or value not in (0, 1):
        raise Reject(f"{key} must be true or false, not {value!r}", code="invalid_params")
    return bool(value)


def _count(extra: dict[str, Any], key: str, default: int, most: int) -> int:
    value = extra.get(key, default)
    if value is None:
        return default
    if type(value) is bool or not isinstance(value, int) or not 0 <= value <= most:
        raise Reject(f"{key} must be an integer from 0 to {most}, not {value!r}", code="invalid_params")
    return value


def words(spec: Inpaint, cropped: bool) -> list[tuple[str, Any]]:
    """What SD WebUI's infotext says of the inpainting, in its order; ``cropped``: whether "Only
    masked" found a region (with a blank mask it repaints nothing and says so in its log)."""
    said: list[tuple[str, Any]] = []
    if spec.invert:
        said.append(("Mask mode", "Inpaint not masked"))
    if spec.blur_x and spec.blur_x == spec.blur_y:  # SD WebUI's one number (none when they differ)
        said.append(("Mask blur", spec.blur_x))
    if cropped:
        said += [("Inpaint area", "Only masked"), ("Masked area padding", spec.padding)]
    if spec.fill != 1 and (cropped or not spec.full_res):
        said.append(("Masked content", FILLS[spec.fill]))
    return said
