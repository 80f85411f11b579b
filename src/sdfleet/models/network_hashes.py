"""The hash SD WebUI 1.10 gives a LoRA file, as its infotexts say it (``Lora hashes``).

A ``.safetensors`` LoRA's hash is the ``sshs_model_hash`` of its metadata when it has one, else
kohya's "addnet" hash: the sha256 of the file past its header (the tensor data), which editing
the metadata does not change. Another file (``.pt``, ``.ckpt``): the sha256 of the whole file. An
infotext gives the first ``SHORT`` hex digits. Kept in memory per (path, size, mtime): reading a
LoRA of a few hundred MB takes a while, once.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from sdfleet.models.layout import sha256_file

SHORT = 12
"""Hex digits of a LoRA's hash in an infotext (SD WebUI's ``shorthash``)."""
_CHUNK = 1 << 20
_HEADER_MAX = 100 << 20
"""A safetensors header larger than this is not read for its metadata (a broken file's length)."""

_lock = threading.Lock()
_known: dict[tuple[str, int, int], str] = {}


def lora_hash(path: Path) -> str:
    """The full hash of the LoRA file at ``path`` (blocking: reads the file the first time)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _lock:
        known = _known.get(key)
    if known is None:
        known = _safetensors_hash(path) if path.suffix.lower() == ".safetensors" else sha256_file(path)
        with _lock:
            _known[key] = known
    return known


def _safetensors_hash(path: Path) -> str:
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        given = _metadata(f.read(length)).get("sshs_model_hash") if length <= _HEADER_MAX else None
        if isinstance(given, str) and given:
            return given
        f.seek(8 + length)
        digest = hashlib.sha256()
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _metadata(header: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(header).get("__metadata__")
    except (ValueError, AttributeError):  # not JSON, or not an object
        return {}
    return meta if isinstance(meta, dict) else {}
