"""Gallery thumbnails: made once and stored next to the image; where they cannot be stored (a role
that may read results but not write beside them, a read-only folder) the gallery shows the image."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from sdfleet.api.thumbs import SIZE, ensure_thumbnail, thumb_key
from sdfleet.storage import open_storage


def png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


async def test_made_once_and_stored_next_to_the_image(tmp_path: Path) -> None:
    storage = open_storage(f"file://{tmp_path}")
    await storage.put("t/a-1.png", png(600), "image/png")
    key = await ensure_thumbnail(storage, "t/a-1.png")
    assert key == thumb_key("t/a-1.png") == "t/a-1.thumb.jpg"
    with Image.open(io.BytesIO(await storage.get(key))) as im:
        assert im.format == "JPEG" and max(im.size) == SIZE
    stored = (tmp_path / key).stat().st_mtime_ns
    assert await ensure_thumbnail(storage, "t/a-1.png") == key
    assert (tmp_path / key).stat().st_mtime_ns == stored, "the second ask finds it"
    assert await ensure_thumbnail(storage, "t/missing.png") is None


async def test_a_thumbnail_that_cannot_be_stored_is_none_not_an_error(
    read_only: Callable[[Path], Path], tmp_path: Path
) -> None:
    src = tmp_path / "results"
    await open_storage(f"file://{src}").put("t/a-1.png", png(600), "image/png")
    assert await ensure_thumbnail(open_storage(f"file://{read_only(src)}"), "t/a-1.png") is None
    assert not (src / "t" / "a-1.thumb.jpg").exists()
