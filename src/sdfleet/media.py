"""What a runtime produced, told by its first bytes: the file extension and content type it is
stored under (the seed's agent sniffs with libmagic; these are the formats runtimes make)."""

from __future__ import annotations

from typing import NamedTuple


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
