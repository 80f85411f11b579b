"""``/extra-single-image`` and ``/extra-batch-images``: SD WebUI's upscale step for its built-in
upscalers (None, Lanczos, Nearest), with its rules: the target is the scaled size rounded down to
a multiple of 8; "None" (the default) leaves the image as it is; the image keeps its PNG text and
gains a ``postprocessing`` entry; ``html_info`` is that entry as HTML.

Model upscalers (ESRGAN …) are run by the diffusers runtime itself (``wants_model``: the route
hands the request over as an extras job); face restoration is not available and is refused.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sdfleet.runtime_server import pnginfo
from sdfleet.runtime_server.errors import failed, invalid_image, refused
from sdfleet.runtime_server.schemas import ExtrasRequest

_RESAMPLE = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
UPSCALERS = ("None", "Lanczos", "Nearest")


@dataclass
class Extra:
    """One input image: decoded, with the PNG text SD WebUI carries over."""

    image: Image.Image
    text: dict[str, str]


def decode(data: bytes) -> Extra:
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:
        raise invalid_image() from e
    text = pnginfo.text_items(image.info)
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    return Extra(image, text)


def _upscaler(name: str) -> str | None:
    if name == "None":
        return None
    if name not in _RESAMPLE:
        raise failed(422, "AssertionError", f"could not find upscaler named {name}", sdwebui=500)
    return name


def _scale(image: Image.Image, upscaler: str, by: float) -> Image.Image:
    """SD WebUI's ``Upscaler.upscale``: scale up to three times, then fit the multiple-of-8 target."""
    dest = (int((image.width * by) // 8 * 8), int((image.height * by) // 8 * 8))
    for i in range(3):
        if image.width >= dest[0] and image.height >= dest[1] and (i > 0 or by != 1):
            break
        before = image.size
        image = image.resize((int(image.width * by), int(image.height * by)), resample=_RESAMPLE[upscaler])
        if before == image.size:
            break
    if image.size != dest:
        image = image.resize(dest, resample=Image.Resampling.LANCZOS)
    return image


def _resize_info(req: ExtrasRequest, info: dict[str, Any]) -> None:
    """The infotext entries of the resize ``req`` asks for (by a factor, or to a size and cropped)."""
    w, h = req.upscaling_resize_w, req.upscaling_resize_h
    if req.resize_mode == 1:
        info["Postprocess upscale to"] = f"{w}x{h}"
    else:
        info["Postprocess upscale by"] = req.upscaling_resize
    if req.resize_mode == 1 and req.upscaling_crop:
        info["Postprocess crop to"] = f"{w}x{h}"


def _one(image: Image.Image, upscaler: str, req: ExtrasRequest, info: dict[str, Any]) -> Image.Image:
    by = req.upscaling_resize
    if req.resize_mode == 1:
        by = max(req.upscaling_resize_w / image.width, req.upscaling_resize_h / image.height)
    _resize_info(req, info)
    out = _scale(image, upscaler, by)
    if req.resize_mode == 1 and req.upscaling_crop:
        w, h = req.upscaling_resize_w, req.upscaling_resize_h
        cropped = Image.new("RGB", (w, h))
        cropped.paste(out, box=(w // 2 - out.width // 2, h // 2 - out.height // 2))
        out = cropped
    return out


def model_upscalers(runtime: object) -> list[str]:
    """The model upscalers ``runtime`` can run (the diffusers runtime lists them in ``upscalers``,
    after the built-in resizers); none for a runtime without them."""
    found = getattr(runtime, "upscalers", None)
    return [n for n in found if n not in UPSCALERS] if isinstance(found, list) else []


def wants_model(req: ExtrasRequest) -> bool:
    """Whether the request names an upscaler other than the built-in ones (a model, or unknown)
    that it would use: with ``upscaler_1`` "None" SD WebUI leaves the image as it is."""
    if req.upscaler_1 == "None":
        return False
    second = req.upscaler_2 not in UPSCALERS and req.extras_upscaler_2_visibility > 0
    return req.upscaler_1 not in UPSCALERS or second


def check(req: ExtrasRequest, models: Sequence[str] = ()) -> None:
    """Refuse, before any work, what this server cannot do. ``models``: the model upscalers the
    runtime has, named exactly as listed (SD WebUI matches names exactly too)."""
    if req.gfpgan_visibility > 0 or req.codeformer_visibility > 0:
        raise refused(422, "face restoration (GFPGAN, CodeFormer) is not available on this server")
    for name in (req.upscaler_1, req.upscaler_2):
        if name not in models:
            _upscaler(name)


def describe(req: ExtrasRequest, first: str, second: str | None) -> str:
    """The ``postprocessing`` infotext of an upscale by ``first`` (and ``second``), as ``process``
    writes it, for an upscale the runtime made."""
    info: dict[str, Any] = {}
    _resize_info(req, info)
    info["Postprocess upscaler"] = first
    if second is not None:
        info["Postprocess upscaler 2"] = second
    return _text(info)


def _text(info: dict[str, Any]) -> str:
    return ", ".join(k if k == v else f"{k}: {v}" for k, v in info.items() if v is not None)


def process(extra: Extra, req: ExtrasRequest) -> tuple[Image.Image, str]:
    """The upscaled image and its ``postprocessing`` infotext."""
    info: dict[str, Any] = {}
    first = _upscaler(req.upscaler_1)
    image = extra.image
    if first is not None:
        image = _one(extra.image, first, req, info)
        info["Postprocess upscaler"] = first
        second = _upscaler(req.upscaler_2) if req.upscaler_2 != "None" else None
        if second is not None and req.extras_upscaler_2_visibility > 0:
            other = _one(extra.image, second, req, info)
            image = Image.blend(image, other.convert(image.mode), req.extras_upscaler_2_visibility)
            info["Postprocess upscaler 2"] = second
    return image, _text(info)


def encode(image: Image.Image, text: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return pnginfo.with_text(buf.getvalue(), text)


def html_info(text: str) -> str:
    """SD WebUI's ``plaintext_to_html``."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"
