"""The ``/sdapi/v1`` endpoints that make or read images: txt2img, img2img, extras, png-info."""

from __future__ import annotations

import io
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image

from sdfleet.media import infotext
from sdfleet.runtime_server import extras, pnginfo
from sdfleet.runtime_server import schemas as S
from sdfleet.runtime_server.errors import invalid_image, refused
from sdfleet.runtime_server.generate import decode_image_field, generate
from sdfleet.runtime_server.images import api_image
from sdfleet.runtime_server.state import ServerState
from sdfleet.tasks import TaskParams, TaskType

router = APIRouter(prefix="/sdapi/v1")


def server(request: Request) -> ServerState:
    state: ServerState = request.app.state.sd
    return state


def _readable(data: bytes) -> bytes:
    """``data`` if it is an image SD WebUI could open ("Invalid encoded image" otherwise)."""
    try:
        Image.open(io.BytesIO(data)).verify()
    except Exception as e:
        raise invalid_image() from e
    return data


@router.post("/txt2img", response_model=S.GenerationResponse)
async def txt2img(request: Request, body: S.Txt2ImgRequest) -> dict[str, Any]:
    return await generate(server(request), body, [])


@router.post("/img2img", response_model=S.GenerationResponse)
async def img2img(request: Request, body: S.Img2ImgRequest) -> dict[str, Any]:
    if body.init_images is None:
        raise refused(404, "Init image not found")
    images = [_readable(decode_image_field(i)) for i in body.init_images]
    if not images:
        raise refused(422, "init_images is empty")
    mask = _readable(decode_image_field(body.mask)) if body.mask else None
    return await generate(server(request), body, images, mask)


async def _extras(state: ServerState, body: S.ExtrasRequest, inputs: list[str]) -> tuple[list[bytes], str]:
    extras.check(body, extras.model_upscalers(state.runtime))
    decoded = [extras.decode(decode_image_field(i)) for i in inputs]
    if extras.wants_model(body):
        return await _model_extras(state, body, decoded)
    outputs: list[bytes] = []
    text = ""
    async with state.exclusive("extras", len(decoded)) as job:
        for item in decoded:
            job.job_no += 1
            if job.interrupted:
                break
            image, text = extras.process(item, body)
            keep = {**item.text, "postprocessing": text} if state.options["enable_pnginfo"] else {}
            outputs.append(extras.encode(image, keep))
    return outputs, extras.html_info(text)


async def _model_extras(
    state: ServerState, body: S.ExtrasRequest, decoded: list[extras.Extra]
) -> tuple[list[bytes], str]:
    """An upscale by a model upscaler: the runtime's own extras job, on its device and under its lock
    (it resolves the names as SD WebUI does and refuses unknown ones with the list)."""
    second = body.upscaler_2 if body.extras_upscaler_2_visibility > 0 and body.upscaler_2 != "None" else None
    params = TaskParams(
        upscaler=body.upscaler_1,
        upscaling_resize=body.upscaling_resize,
        extra={
            "upscaler_2": second,
            "extras_upscaler_2_visibility": body.extras_upscaler_2_visibility,
            "resize_mode": body.resize_mode,
            "upscaling_resize_w": body.upscaling_resize_w,
            "upscaling_resize_h": body.upscaling_resize_h,
            "upscaling_crop": body.upscaling_crop,
        },
    )
    images = [extras.encode(item.image, {}) for item in decoded]
    result = await state.run(
        TaskType.EXTRA_BATCH_IMAGES, params, images, model=state.selected or "", job="extras", iterations=1
    )
    text = extras.describe(body, body.upscaler_1, second)
    outputs = []
    for item, png in zip(decoded, result.images, strict=True):
        keep = {**item.text, "postprocessing": text} if state.options["enable_pnginfo"] else {}
        outputs.append(extras.encode(extras.decode(png).image, keep))
    return outputs, extras.html_info(text)


@router.post("/extra-single-image", response_model=S.ExtrasSingleImageResponse)
async def extra_single_image(request: Request, body: S.ExtrasSingleImageRequest) -> dict[str, Any]:
    state = server(request)
    outputs, html = await _extras(state, body, [body.image])
    return {"html_info": html, "image": api_image(outputs[0], state.options) if outputs else None}


@router.post("/extra-batch-images", response_model=S.ExtrasBatchImagesResponse)
async def extra_batch_images(request: Request, body: S.ExtrasBatchImagesRequest) -> dict[str, Any]:
    state = server(request)
    outputs, html = await _extras(state, body, [item.data for item in body.imageList])
    return {"html_info": html, "images": [api_image(png, state.options) for png in outputs]}


@router.post("/png-info", response_model=S.PNGInfoResponse)
async def png_info(body: S.PNGInfoRequest) -> dict[str, Any]:
    data = decode_image_field(body.image.strip())
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as e:
        raise invalid_image() from e
    items = {k: v for k, v in image.info.items() if k not in pnginfo.IGNORED_INFO_KEYS}
    items.pop("parameters", None)
    items.pop("exif", None)  # where a JPEG or WebP keeps it, as SD WebUI reads it
    items = {k: v for k, v in items.items() if isinstance(v, str | int | float | bool)}
    text = infotext(image) or ""
    return {"info": text, "items": items, "parameters": pnginfo.parse(text)}
