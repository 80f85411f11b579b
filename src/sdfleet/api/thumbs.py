"""Thumbnails of result images, made once and stored next to them (``x-1.png`` → ``x-1.thumb.jpg``).

The gallery asks for them; the first ask makes and stores each one (Pillow, in a thread), later
asks find it in storage. Two first asks at once both make it and write the same bytes.
"""

from __future__ import annotations

import asyncio
import io
import logging

from PIL import Image, UnidentifiedImageError

from sdfleet.errors import NotFound, SdfleetError
from sdfleet.storage.base import BlobStore

log = logging.getLogger(__name__)

SIZE = 256
"""Longest side of a thumbnail, pixels."""
SUFFIX = ".thumb.jpg"


def thumb_key(image_key: str) -> str:
    stem = image_key.rsplit(".", 1)[0] if "." in image_key.rsplit("/", 1)[-1] else image_key
    return stem + SUFFIX


def make_thumbnail(data: bytes, size: int = SIZE) -> bytes:
    """A JPEG no larger than ``size`` on its longest side; small images keep their size."""
    with Image.open(io.BytesIO(data)) as im:
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        im.convert("RGB").save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()


async def ensure_thumbnail(storage: BlobStore, image_key: str) -> str | None:
    """The thumbnail's key, made and stored on the first call; None when the image cannot be read
    (gone, or not an image) or the thumbnail not stored: the gallery then shows the full image or
    nothing."""
    key = thumb_key(image_key)
    if await storage.exists(key):
        return key
    try:
        data = await storage.get(image_key)
        thumb = await asyncio.to_thread(make_thumbnail, data)
    except (NotFound, UnidentifiedImageError, OSError) as e:
        log.warning("no thumbnail for %s: %s", image_key, e)
        return None
    try:
        await storage.put(key, thumb, "image/jpeg")
    except SdfleetError as e:  # e.g. a role that may read results but not write next to them
        log.warning("thumbnail of %s not stored, the gallery shows the image: %s", image_key, e)
        return None
    return key
