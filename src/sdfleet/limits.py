"""The size limits of outputs the API checks at submit (``api.max_width`` × ``api.max_height``).

An upscale (``extra-single-image``, ``extra-batch-images``) makes an image ``upscaling_resize``
times its input, so its output size is only known once the input's is: a 4000² input at ×8 is a
32000² output. The API checks it at submit for inputs in the body (``data:`` URLs, base64); for
inputs behind http(s) URLs the agent bounds the input (``agent.input_max_pixels``) and the diffusers
runtime the output (``upscale_max_pixels``, ``_diffusers_upscale.check_pixels``), as it bounds a
generation published past the API (``generate_max_pixels``).
"""

from __future__ import annotations

from collections.abc import Sequence

from sdfleet import hires, variation
from sdfleet.errors import Reject, ValidationFailed
from sdfleet.tasks import GENERATE, TaskParams, TaskType

UPSCALES = (TaskType.EXTRA_SINGLE_IMAGE, TaskType.EXTRA_BATCH_IMAGES)


def output_sizes(
    kind: TaskType, params: TaskParams, input_sizes: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """The (width, height) of each image a task makes, given its inputs' sizes."""
    if kind in UPSCALES:
        k = params.upscaling_resize
        return [(round(w * k), round(h * k)) for w, h in input_sizes]
    second = hires.plan(kind, params)
    return [second.size if second else (params.width, params.height)]


def check_output_size(
    kind: TaskType,
    params: TaskParams,
    input_sizes: Sequence[tuple[int, int]],
    max_width: int,
    max_height: int,
) -> None:
    """Raise ``ValidationFailed`` (code ``too_large``) when an output, or the noise of variation
    seeds' ``seed_resize_from``, would exceed the maximum (``invalid_params`` for a hires fix or a
    variation asking for no size SD WebUI would make)."""
    try:
        sizes = output_sizes(kind, params, input_sizes)
        varied = variation.read(params) if kind in GENERATE else None
    except Reject as e:
        raise ValidationFailed(e.reason, code=e.code) from None
    if varied is not None and varied.resize_from is not None:
        width, height = varied.resize_from
        if width > max_width or height > max_height:
            raise ValidationFailed(
                f"seed_resize_from {width}x{height} is over the maximum {max_width}x{max_height}",
                code="too_large",
            )
    for width, height in sizes:
        if width > max_width or height > max_height:
            made = f" ({params.upscaling_resize:g} × the input)" if kind in UPSCALES else ""
            made = " (its hires pass)" if hires.asked(kind, params) else made
            raise ValidationFailed(
                f"output size {width}x{height}{made} is over the maximum {max_width}x{max_height}",
                code="too_large",
            )
