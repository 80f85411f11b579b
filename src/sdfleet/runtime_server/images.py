"""An image as SD WebUI's API sends it back: base64, in the format its ``samples_format`` option
names (``modules/api/api.py``, ``encode_pil_to_base64``): PNG as made; JPEG or WebP at its
``jpeg_quality``, with the infotext in EXIF ``UserComment`` (``media.reencode`` writes it there)."""

from __future__ import annotations

import base64

from sdfleet.media import reencode
from sdfleet.runtime_server.errors import refused
from sdfleet.runtime_server.options import Options
from sdfleet.tasks import OutputFormat

_FORMATS: dict[str, OutputFormat] = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}


def api_image(png: bytes, options: Options) -> str:
    """``png`` (with its text chunks) as the API answers it. An unknown ``samples_format`` is
    SD WebUI's 500 "Invalid image format" (a 422 here, as this server answers such settings)."""
    fmt = _FORMATS.get(str(options["samples_format"]).lower())
    if fmt is None:
        raise refused(422, "Invalid image format", sdwebui=500)
    data = png if fmt == "png" else reencode(png, fmt, int(options["jpeg_quality"]))
    return base64.b64encode(data).decode("ascii")
