"""What a runtime produced, told by its first bytes: the file extension and content type it is
stored under (the seed's agent sniffs with libmagic; these are the formats runtimes make); and a
still image re-encoded in the format a task asks for (``reencode``)."""

from __future__ import annotations

import io
import struct
from typing import NamedTuple

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdfleet.tasks import OutputFormat


class Media(NamedTuple):
    ext: str
    """Without the dot: ``png``, ``mp4``…"""
    mime: str


UNKNOWN = Media("bin", "application/octet-stream")


def sniff(data: bytes) -> Media:
    """The format of ``data`` (PNG, JPEG, GIF, WebP, MP4/MOV, WebM, JSON), else ``bin``."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Media("png", "image/png")
    if head.startswith(b"\xff\xd8\xff"):
        return Media("jpg", "image/jpeg")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return Media("gif", "image/gif")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Media("webp", "image/webp")
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return Media("mov", "video/quicktime") if brand == b"qt  " else Media("mp4", "video/mp4")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return Media("webm", "video/webm")
    if head.lstrip()[:1] in (b"{", b"["):
        return Media("json", "application/json")
    return UNKNOWN


_STILL = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
"""Sniffed extension → Pillow's format name, for the images ``reencode`` converts."""
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
"""Where SD WebUI keeps an infotext in a JPEG or WebP (piexif's ``ExifIFD.UserComment``)."""
_UNICODE = b"UNICODE\x00"


def reencode(data: bytes, fmt: OutputFormat, quality: int = 90) -> bytes:
    """A still image (PNG, JPEG, WebP) as ``fmt``; anything else (GIF, video, an image already
    in ``fmt``) as it is. JPEG and WebP are lossy at ``quality`` (1-100); JPEG has no alpha, so a
    transparent image is flattened onto black, as SD WebUI saves one. The infotext goes along the
    way SD WebUI writes it: PNG's ``parameters`` text, EXIF ``UserComment`` in JPEG and WebP."""
    current = sniff(data).ext
    wanted = "jpg" if fmt == "jpeg" else fmt
    if current not in _STILL or current == wanted:
        return data
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        text = infotext(image)
        if fmt == "png":
            return to_png(image, text)
        out = io.BytesIO()
        flat = image.convert("RGB") if fmt == "jpeg" and image.mode not in ("RGB", "L") else image
        exif = _user_comment_exif(text) if text else b""
        flat.save(out, format=_STILL[wanted], quality=quality, exif=exif)
        return out.getvalue()


def to_png(image: Image.Image, parameters: str | None = None) -> bytes:
    """``image`` as a PNG, with its infotext as SD WebUI writes it (the ``parameters`` text)."""
    buf = io.BytesIO()
    pnginfo = None
    if parameters is not None:
        pnginfo = PngInfo()
        pnginfo.add_text("parameters", parameters)
    image.save(buf, format="PNG", pnginfo=pnginfo)
    return buf.getvalue()


def _user_comment_exif(text: str) -> bytes:
    """An EXIF block holding only ``text`` as the Exif IFD's ``UserComment`` (type UNDEFINED, in
    UCS-2 with the ``UNICODE`` prefix), as piexif writes it for SD WebUI: Pillow would type the
    tag BYTE, which piexif (so SD WebUI's PNG Info) cannot read."""
    value = _UNICODE + text.encode("utf-16-be")
    exif_ifd = 8 + 2 + 12 + 4  # after the header and IFD0's one entry
    data = exif_ifd + 2 + 12 + 4
    return b"".join(
        (
            b"Exif\x00\x00II*\x00",
            struct.pack("<I", 8),
            struct.pack("<HHHII", 1, EXIF_IFD, 4, 1, exif_ifd),  # IFD0: the Exif IFD's offset
            struct.pack("<IHHHII", 0, 1, USER_COMMENT, 7, len(value), data),
            struct.pack("<I", 0),
            value,
        )
    )


def infotext(image: Image.Image) -> str | None:
    """The generation parameters an image carries: PNG's ``parameters`` text, else its EXIF
    ``UserComment`` (SD WebUI's JPEG and WebP), else None."""
    text = image.info.get("parameters")
    if isinstance(text, str):
        return text
    raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if not isinstance(raw, bytes) or len(raw) < 8:
        return raw if isinstance(raw, str) and raw else None
    head, body = raw[:8], raw[8:]
    if head == _UNICODE:
        return body.decode("utf-16-be", errors="replace")
    return body.decode("ascii", errors="replace").rstrip("\x00") or None
