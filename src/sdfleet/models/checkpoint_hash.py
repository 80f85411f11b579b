"""The hash SD WebUI 1.10 gives a checkpoint: its infotexts' ``Model hash`` and ``/sd-models``' titles.

A single-file checkpoint's hash is the sha256 of the file (SD WebUI's ``sha256``; ``SHORT`` hex
digits of it in an infotext), remembered in the models folder's checksum cache
(``layout.ChecksumCache``), where ``sdfleet models pull`` records what it checked on download: a
worker that pulled its model hashes nothing. Reading a multi-GB file takes seconds, once. A
diffusers folder, which SD WebUI does not load, is sdfleet's own: the sha256 of its
``model_index.json`` and its file listing (names and sizes), made anew each time (milliseconds).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from pathlib import Path

from sdfleet.models.catalog import ModelInfo
from sdfleet.models.layout import ChecksumCache

SHORT = 10
"""Hex digits of a checkpoint's hash in an infotext and a title (SD WebUI's ``shorthash``)."""

_lock = threading.Lock()
_folders: dict[Path, str] = {}
"""The folders hashed in this process (``known`` tells those only, as for an unread file)."""
_reading: dict[Path, threading.Lock] = {}
"""One lock per file: a second caller waits for the first one's reading, then finds it remembered."""


@functools.cache
def _cache(root: Path) -> ChecksumCache:
    return ChecksumCache(root)  # one per folder in a process: a read-only one remembers in memory


def sha256(info: ModelInfo) -> str:
    """The checkpoint's full hash (blocking: may read the whole file)."""
    if info.kind == "diffusers":
        digest = _folder_sha256(info.path)
        with _lock:
            _folders[info.path] = digest
        return digest
    path = info.path.absolute()
    with _lock:
        reading = _reading.setdefault(path, threading.Lock())
    with reading:
        return _cache(path.parent).sha256(path.name)


def known(info: ModelInfo) -> str | None:
    """The checkpoint's full hash if it was made before (by this process, or for a file by any
    process using the folder), else None without reading the checkpoint."""
    if info.kind == "diffusers":
        with _lock:
            return _folders.get(info.path)
    try:
        return _cache(info.path.parent.absolute()).known(info.path.name)
    except OSError:  # gone since it was listed
        return None


def _folder_sha256(path: Path) -> str:
    digest = hashlib.sha256((path / "model_index.json").read_bytes())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path)}\0{f.stat().st_size}\n".encode())
    return digest.hexdigest()
