"""Blob storage backends, chosen by URL scheme (``file://``, ``s3://``)."""

from __future__ import annotations

from sdfleet.registry import load_backend
from sdfleet.storage.base import BlobStore, check_key

_BACKENDS = {
    "file": ("sdfleet.storage.backends.local", "LocalBlobStore", None),
    "s3": ("sdfleet.storage.backends.s3", "S3BlobStore", "aws"),
}


def open_storage(url: str) -> BlobStore:
    storage: BlobStore = load_backend("storage", _BACKENDS, url)
    return storage


__all__ = ["BlobStore", "check_key", "open_storage"]
