"""What the fleet allows of a task, beyond what the models themselves check; applied at submit."""

from __future__ import annotations

import asyncio
import re

from sdfleet import hires, refiner
from sdfleet.api.deps import ApiContext
from sdfleet.api.seed_schemas import INPUT_URL_PATTERN, URL_PATTERN
from sdfleet.errors import InputFetchError, InputUnavailable, NotFound, Reject, ValidationFailed
from sdfleet.guarded_http import check_url, decode_inline, image_size
from sdfleet.limits import check_output_size
from sdfleet.models.catalog import default_model
from sdfleet.runtimes.unsupported import batches
from sdfleet.tasks import GENERATE, Task, TaskType

_URL = re.compile(URL_PATTERN)
_INPUT_URL = re.compile(INPUT_URL_PATTERN)
URL_FORM = "an http(s) URL with a host name or IPv4 address, an optional port, and URL-safe path and query"

NEEDS_PROMPT = (TaskType.TEXT_TO_IMAGE,)
NEEDS_IMAGE = (TaskType.IMAGE_TO_IMAGE, TaskType.EXTRA_SINGLE_IMAGE, TaskType.EXTRA_BATCH_IMAGES)


def check_task(ctx: ApiContext, task: Task) -> None:
    """Size, required inputs, the model, and every input image carried in the body."""
    p, s = task.params, ctx.settings
    if p.width > s.max_width or p.height > s.max_height:
        raise ValidationFailed(
            f"size {p.width}x{p.height} is over the maximum {s.max_width}x{s.max_height}", code="too_large"
        )
    if task.type in NEEDS_PROMPT and not p.prompt.strip():
        raise ValidationFailed(f"{task.type.value} tasks need a prompt", code="missing_prompt")
    if task.type in NEEDS_IMAGE and not p.init_images:
        raise ValidationFailed(f"{task.type.value} tasks need an input image", code="missing_image")
    if task.type is TaskType.PIPELINE and not p.workflow:
        raise ValidationFailed("pipeline tasks need a workflow", code="missing_workflow")
    try:
        batches(p)  # SD WebUI's own bound on its batch count; batch_size is bounded by TaskParams
    except Reject as e:
        raise ValidationFailed(e.reason, code=e.code) from None
    _check_model(ctx, task.model or default_model(ctx.fleet.models.default, ctx.catalog))
    try:
        checkpoint = hires.checkpoint_of(p) if hires.asked(task.type, p) else None
        refining = refiner.read(p) if task.type in GENERATE else None
    except Reject as e:
        raise ValidationFailed(e.reason, code=e.code) from None
    _check_model(ctx, checkpoint, "hr_checkpoint_name: ")
    _check_model(ctx, refining.checkpoint if refining else None, "refiner_checkpoint: ")
    check_inline_inputs(ctx, task)


def _check_model(ctx: ApiContext, model: str | None, field: str = "") -> None:
    """A model the models folder lacks is refused (``field``: what named it)."""
    # With models.s3 the agents fetch what their folder lacks (and fail the task no_model when the
    # bucket lacks it too): the API's own folder is not the list of models there are.
    if not model or ctx.catalog is None or ctx.fleet.models.s3 is not None:
        return
    models = ctx.catalog.list()
    try:
        if models:
            ctx.catalog.resolve(model)
    except NotFound as e:  # its own message names the models folder: not for clients
        names = ", ".join(m.name for m in models)
        raise ValidationFailed(
            f"{field}model {model!r} not found (available: {names})", code="unknown_model"
        ) from e


def check_inline_inputs(ctx: ApiContext, task: Task) -> None:
    """Inputs in the body (``data:`` URLs, base64), an inpainting mask among them, must be images
    of at most ``api.max_input_pixels``, and what an upscale makes of them at most the maximum
    size. Inputs behind http(s) URLs are checked by the agent that fetches them."""
    sizes = [_inline_size(ctx, url, f"input image {n}") for n, url in enumerate(task.params.init_images, 1)]
    mask = task.params.extra.get("mask") if task.type is TaskType.IMAGE_TO_IMAGE else None
    if isinstance(mask, str) and mask:  # fetched by the agent with the inputs
        _inline_size(ctx, mask, "mask")
    found = [size for size in sizes if size is not None]
    check_output_size(task.type, task.params, found, ctx.settings.max_width, ctx.settings.max_height)


def _inline_size(ctx: ApiContext, url: str, what: str) -> tuple[int, int] | None:
    """The size of an image given in the body; None for one behind a URL of a form agents fetch."""
    try:
        data = decode_inline(url, ctx.settings.max_body_bytes)
        if data is not None:
            return image_size(data, ctx.settings.max_input_pixels)
        if not _INPUT_URL.fullmatch(url.strip()):
            raise InputFetchError(f"{url[:100]!r} is not {URL_FORM}, an s3:// URL, a data: URL or base64")
    except InputFetchError as e:
        code = "too_large" if e.code == "input_too_large" else "bad_image"
        raise ValidationFailed(f"{what}: {e.message or e}", code=code) from e
    return None


async def check_webhook(ctx: ApiContext, task: Task) -> None:
    """The SSRF guard agents apply before each delivery, applied once more here so a client
    learns at once that its webhook URL will never be called."""
    if task.webhook is None:
        return
    url = task.webhook.url
    try:
        check_url(url, allow_private=True)  # the form alone first: no lookup for a wrong scheme
        if not _URL.fullmatch(url):
            raise InputFetchError(f"{url[:100]!r} is not {URL_FORM}")
        await asyncio.to_thread(check_url, url, allow_private=ctx.webhook.allow_private)
    except InputUnavailable as e:  # the resolver could not answer now: a 503, not a refused URL
        raise InputUnavailable(e.message, code="dns_unavailable") from e
    except InputFetchError as e:
        raise ValidationFailed(f"webhook URL refused: {e.message or e}", code="bad_webhook") from e
