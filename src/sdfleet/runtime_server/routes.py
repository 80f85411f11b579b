"""The ``/sdapi/v1`` endpoints."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request

from sdfleet.compat._common import params_from_a1111
from sdfleet.errors import Interrupted, ValidationFailed
from sdfleet.runtime_server import schemas as S
from sdfleet.runtime_server.state import ServerState
from sdfleet.runtimes.base import RuntimeResult
from sdfleet.tasks import TaskParams, TaskType

router = APIRouter(prefix="/sdapi/v1")
# SD WebUI's "None" upscaler resizes with Lanczos.
_UPSCALERS = {"None": None, "Lanczos": "Lanczos", "Nearest": "Nearest"}


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.sd
    return state


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_image_field(text: str) -> bytes:
    """An image field: base64, or a ``data:image/...;base64,`` URL. URLs are refused (no fetching)."""
    if text.startswith(("http://", "https://")):
        raise ValidationFailed("image URLs are not fetched by this server; send base64")
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as e:
        raise ValidationFailed(f"invalid encoded image: {e}") from e


def _params(kind: TaskType, body: dict[str, Any]) -> TaskParams:
    n_iter = body.pop("n_iter", 1)
    if isinstance(n_iter, int) and n_iter > 1:
        body["batch_size"] = int(body.get("batch_size", 1)) * n_iter  # same seeds, same order
    if kind in (TaskType.EXTRA_SINGLE_IMAGE, TaskType.EXTRA_BATCH_IMAGES):
        body["upscaler_1"] = _UPSCALERS.get(body.get("upscaler_1", "None"), body.get("upscaler_1"))
        if body["upscaler_1"] is None:
            del body["upscaler_1"]
    # Images travel as bytes in the job; TaskParams must not carry megabytes of base64.
    body.pop("init_images", None)
    body.pop("image", None)
    body.pop("imageList", None)
    return params_from_a1111(kind, body)


async def _run(state: ServerState, kind: TaskType, body: dict[str, Any], images: list[str]) -> RuntimeResult:
    params = _params(kind, dict(body))
    data = [decode_image_field(i) for i in images]
    try:
        return await state.run(kind, params, data)
    except Interrupted:
        # SD WebUI answers an interrupted call with 200 and what it made so far: here, nothing.
        return RuntimeResult(images=[], info={"interrupted": True})


def _generation(result: RuntimeResult, request: S.GenerationRequest) -> dict[str, Any]:
    images = [_b64(png) for png in result.images] if request.send_images else []
    return {"images": images, "parameters": request.model_dump(), "info": json.dumps(result.info)}


@router.post("/txt2img", response_model=S.GenerationResponse)
async def txt2img(request: Request, body: S.Txt2ImgRequest) -> dict[str, Any]:
    payload = body.model_dump(exclude_unset=True)
    result = await _run(_state(request), TaskType.TEXT_TO_IMAGE, payload, [])
    return _generation(result, body)


@router.post("/img2img", response_model=S.GenerationResponse)
async def img2img(request: Request, body: S.Img2ImgRequest) -> dict[str, Any]:
    payload = body.model_dump(exclude_unset=True)
    images = list(body.init_images or [])
    result = await _run(_state(request), TaskType.IMAGE_TO_IMAGE, payload, images)
    out = _generation(result, body)
    if not body.include_init_images:
        out["parameters"]["init_images"] = None
    return out


@router.post("/extra-single-image", response_model=S.ExtrasSingleImageResponse)
async def extra_single_image(request: Request, body: S.ExtrasSingleImageRequest) -> dict[str, Any]:
    payload = body.model_dump()
    result = await _run(_state(request), TaskType.EXTRA_SINGLE_IMAGE, payload, [body.image])
    image = _b64(result.images[0]) if result.images and body.show_extras_results else None
    return {"html_info": "", "image": image}


@router.post("/extra-batch-images", response_model=S.ExtrasBatchImagesResponse)
async def extra_batch_images(request: Request, body: S.ExtrasBatchImagesRequest) -> dict[str, Any]:
    payload = body.model_dump()
    images = [item.data for item in body.imageList]
    result = await _run(_state(request), TaskType.EXTRA_BATCH_IMAGES, payload, images)
    return {"html_info": "", "images": [_b64(png) for png in result.images]}


@router.get("/progress", response_model=S.ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    return _state(request).progress()


@router.post("/interrupt")
async def interrupt(request: Request) -> dict[str, Any]:
    await _state(request).interrupt()
    return {}


@router.post("/skip")
async def skip(request: Request) -> dict[str, Any]:
    return {}


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    state = _state(request)
    title = await asyncio.to_thread(state.current_title)
    sha = title.rsplit("[", 1)[-1].rstrip("]") if title and title.endswith("]") else None
    return {**state.options, "sd_model_checkpoint": title, "sd_checkpoint_hash": sha, "samples_format": "png"}


@router.post("/options")
async def set_options(request: Request, body: Annotated[dict[str, Any], Body()]) -> None:
    state = _state(request)
    checkpoint = body.pop("sd_model_checkpoint", None)
    if isinstance(checkpoint, str) and checkpoint:
        await state.load(checkpoint)
    state.options.update(body)


@router.get("/sd-models", response_model=list[S.SDModelItem])
async def sd_models(request: Request) -> list[dict[str, Any]]:
    return await asyncio.to_thread(_state(request).checkpoints.items)


@router.post("/refresh-checkpoints")
async def refresh_checkpoints() -> None:
    return None  # the catalog reads the models directory on every call


@router.get("/samplers", response_model=list[S.SamplerItem])
async def samplers() -> list[dict[str, Any]]:
    from sdfleet.runtimes._diffusers_pipes import SAMPLERS

    return [{"name": name, "aliases": [], "options": {}} for name in SAMPLERS]


@router.get("/upscalers", response_model=list[S.UpscalerItem])
async def upscalers() -> list[dict[str, Any]]:
    return [{"name": name, "scale": 4 if name == "None" else None} for name in _UPSCALERS]


@router.get("/scripts", response_model=S.ScriptsList)
async def scripts() -> dict[str, Any]:
    return {"txt2img": [], "img2img": []}
