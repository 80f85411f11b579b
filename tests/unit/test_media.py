"""Outputs are stored under their real type: sniffed from their first bytes, as the seed's agent does;
and re-encoded in the format a task asks for, keeping their infotext where SD WebUI does."""

from __future__ import annotations

import io
import re
import struct

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from fakes.runtimes import media_samples
from sdfleet.agent.parts import output_keys
from sdfleet.media import UNKNOWN, USER_COMMENT, infotext, reencode, sniff
from sdfleet.tasks import Task


def test_sniffs_what_runtimes_make() -> None:
    assert [sniff(d) for d in media_samples()] == [
        ("png", "image/png"),
        ("gif", "image/gif"),
        ("webp", "image/webp"),
        ("mp4", "video/mp4"),
    ]
    assert sniff(b"\xff\xd8\xff\xe0rest") == ("jpg", "image/jpeg")
    assert sniff(b"\x1a\x45\xdf\xa3....") == ("webm", "video/webm")
    assert sniff(b'  {"a": 1}') == ("json", "application/json")
    assert sniff(b"") == UNKNOWN and sniff(b"hello") == UNKNOWN


@pytest.mark.parametrize(
    ("task", "prefix"),
    [
        (Task(id="t1", tenant="acme"), "acme/t1/t1"),
        (Task(id="t2", output_prefix="outputs"), "outputs/t2/t2"),
    ],
)
def test_output_keys_follow_the_seeds_layout(task: Task, prefix: str) -> None:
    keys, out = output_keys(task, media_samples())
    tag = re.fullmatch(rf"{prefix}-([0-9a-f]{{4}})-1\.png", keys[0])
    assert tag is not None, keys[0]
    t = tag.group(1)
    assert keys == [
        f"{prefix}-{t}-1.png",
        f"{prefix}-{t}-2.gif",
        f"{prefix}-{t}-3.webp",
        f"{prefix}-{t}-4.mp4",
    ]
    assert out == f"{prefix}-{t}.out"
    tags = {output_keys(task, [b""])[1] for _ in range(20)}
    assert len(tags) > 1  # a new tag per run, so a re-used id never overwrites earlier results


def _png(mode: str = "RGBA", text: str | None = "a lighthouse, ünïcode\nSteps: 2, Seed: 5") -> bytes:
    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    buf = io.BytesIO()
    Image.new(mode, (64, 48), (200, 10, 10, 128) if mode == "RGBA" else (200, 10, 10)).save(
        buf, format="PNG", pnginfo=info
    )
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "ext", "mode"), [("jpeg", "jpg", "RGB"), ("webp", "webp", "RGBA")])
def test_a_png_is_reencoded_with_its_infotext_where_sd_webui_keeps_it(fmt: str, ext: str, mode: str) -> None:
    """JPEG and WebP carry the infotext as SD WebUI writes it (piexif's Exif-IFD ``UserComment``,
    type UNDEFINED, ``UNICODE`` + UCS-2), which its PNG Info reads; back to PNG it is the
    ``parameters`` text again. JPEG has no alpha."""
    text = "a lighthouse, ünïcode\nSteps: 2, Seed: 5"
    out = reencode(_png(), fmt, 80)  # type: ignore[arg-type]
    assert sniff(out).ext == ext
    with Image.open(io.BytesIO(out)) as image:
        assert (image.size, image.mode, infotext(image)) == ((64, 48), mode, text)
        value = b"UNICODE\x00" + text.encode("utf-16-be")
        assert struct.pack("<HHI", USER_COMMENT, 7, len(value)) in image.info["exif"]  # UNDEFINED
    back = reencode(out, "png")
    with Image.open(io.BytesIO(back)) as image:
        assert sniff(back).ext == "png" and image.info["parameters"] == text


def test_what_is_not_reencoded() -> None:
    png = _png(text=None)
    assert reencode(png, "png") is png  # already in the format
    for other in media_samples()[1:2] + media_samples()[3:]:  # GIF, MP4: stored as made
        assert reencode(other, "webp") is other
    out = reencode(png, "jpeg", 50)
    with Image.open(io.BytesIO(out)) as image:
        assert infotext(image) is None and "exif" not in image.info
    small, large = reencode(_png("RGB"), "jpeg", 10), reencode(_png("RGB"), "jpeg", 95)
    assert len(small) < len(large)  # quality is applied
