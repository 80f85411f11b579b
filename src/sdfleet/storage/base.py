"""Object storage for result images and ``.out`` JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes, content_type: str) -> str:
        """Store ``data`` under ``key`` (``a/b/c.png``, no leading slash); returns its location URL
        (``file:///…`` or ``s3://bucket/key``)."""

    async def get(self, key: str) -> bytes:
        """The bytes at ``key``; raises ``NotFound``."""

    async def exists(self, key: str) -> bool: ...

    async def files(self, folder: str) -> list[str]:
        """The keys stored directly in ``folder`` (``a/b`` holds ``a/b/x.png``, not ``a/b/c/y.png``),
        sorted; none for a folder that holds nothing."""

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove whatever is stored under ``keys``; a key with nothing there is no error."""

    def location(self, key: str) -> str:
        """Where ``key`` lives, as the seed reports it (``s3://bucket/key`` or a ``file://`` URL)."""

    async def presign(self, key: str, expires_s: int) -> str | None:
        """A URL a client can GET without credentials, or None where the API must serve it."""

    async def aclose(self) -> None: ...


def check_key(key: str) -> str:
    """Refuse keys that could escape the prefix (``..``, absolute, empty parts)."""
    from sdfleet.errors import ValidationFailed

    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValidationFailed(f"bad storage key {key!r}")
    return key
