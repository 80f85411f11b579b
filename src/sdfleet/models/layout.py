"""Which files make up which model, in a models folder and under an S3 prefix alike.

A model is a top-level entry of the folder (or prefix): a diffusers folder ``NAME/`` with a
``model_index.json``, or a single-file checkpoint ``NAME.safetensors`` / ``NAME.ckpt`` together
with its sidecar config folder ``NAME.config/`` when there is one. Names starting with ``.`` are
never models (``.sdfleet/`` holds transfer state).

Order matters for atomicity: a folder model becomes visible when its ``model_index.json`` lands
and a single-file model when its weights file lands, so transfers put those files last
(``visible_last``) and a reader never sees half a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sdfleet.models.catalog import CONFIG_SUFFIX, SINGLE_FILE_SUFFIXES

log = logging.getLogger(__name__)

STATE_DIR = ".sdfleet"
"""Transfer state inside a models folder (partial files, checksums, locks); never a model."""
INDEX = "model_index.json"


@dataclass(frozen=True)
class ModelFiles:
    """A model's files: path relative to the models root (POSIX form) → size in bytes."""

    name: str
    files: dict[str, int]

    @property
    def size(self) -> int:
        return sum(self.files.values())

    @property
    def kind(self) -> str:
        return "single-file" if PurePosixPath(self.name).suffix in SINGLE_FILE_SUFFIXES else "diffusers"


def group(paths: Iterable[str]) -> dict[str, list[str]]:
    """Relative POSIX paths → model name → the paths that belong to it (others are dropped)."""
    by_top: dict[str, list[str]] = {}
    for path in paths:
        top = path.split("/", 1)[0]
        if top and not top.startswith("."):
            by_top.setdefault(top, []).append(path)
    models: dict[str, list[str]] = {}
    for top, members in by_top.items():
        if top in members and PurePosixPath(top).suffix in SINGLE_FILE_SUFFIXES:
            models.setdefault(top, []).extend(members)
        elif f"{top}/{INDEX}" in members and not top.endswith(CONFIG_SUFFIX):
            models[top] = members
    for top, members in by_top.items():
        if not top.endswith(CONFIG_SUFFIX) or f"{top}/{INDEX}" not in members:
            continue
        stem = top[: -len(CONFIG_SUFFIX)]
        owner = next((stem + s for s in SINGLE_FILE_SUFFIXES if stem + s in models), None)
        if owner is not None:
            models[owner].extend(members)
    return {name: sorted(members) for name, members in sorted(models.items())}


def visible_last(name: str, paths: Iterable[str]) -> list[str]:
    """``paths`` in transfer order: the file that makes the model visible comes last."""
    last = name if PurePosixPath(name).suffix in SINGLE_FILE_SUFFIXES else f"{name}/{INDEX}"
    ordered = sorted(paths)
    if last in ordered:
        ordered.remove(last)
        ordered.append(last)
    return ordered


def top_entries(name: str) -> list[str]:
    """The top-level entries a model occupies: itself, and a single file's sidecar folder."""
    if PurePosixPath(name).suffix in SINGLE_FILE_SUFFIXES:
        return [f"{PurePosixPath(name).stem}{CONFIG_SUFFIX}", name]
    return [name]


def local_models(root: Path) -> dict[str, ModelFiles]:
    """The models under ``root`` with their files and sizes."""
    if not root.is_dir():
        return {}
    sizes: dict[str, int] = {}
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            sizes[entry.name] = entry.stat().st_size
        elif entry.is_dir():
            for dirpath, dirnames, filenames in os.walk(entry):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for f in filenames:
                    path = Path(dirpath, f)
                    sizes[path.relative_to(root).as_posix()] = path.stat().st_size
    grouped = group(sizes)
    return {name: ModelFiles(name, {p: sizes[p] for p in paths}) for name, paths in grouped.items()}


def sha256_file(path: Path, chunk: int = 4 * 2**20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ChecksumCache:
    """SHA-256 of local files, remembered by (size, mtime) in ``<root>/.sdfleet/checksums.json``.

    Hashing a multi-GB checkpoint takes seconds; a sync compares many, and an infotext's ``Model
    hash`` needs one. Processes share the file (an agent reads what a ``models pull`` beside it
    checked on download): a miss reads it again, a write merges into what is there. A lost or
    stale entry only costs a re-hash, so concurrent writers replace the file atomically and
    nothing more; a folder that cannot be written is remembered in memory only.
    """

    def __init__(self, root: Path, *, persist: bool = True) -> None:
        """``persist=False``: remember in memory only (for folders that are not a models folder)."""
        self.path = root / STATE_DIR / "checksums.json"
        self.root = root
        self.persist = persist
        self._lock = threading.Lock()
        self._entries: dict[str, list[object]] = {}

    def _on_disk(self) -> dict[str, list[object]]:
        if not self.persist:
            return {}
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def known(self, rel: str) -> str | None:
        """The checksum remembered for ``root/rel`` as it is on disk now, else None (blocking:
        reads the cache file when this process has none)."""
        st = (self.root / rel).stat()
        now = [st.st_size, st.st_mtime_ns]
        with self._lock:
            entry = self._entries.get(rel)
            if not (isinstance(entry, list) and entry[:2] == now):
                self._entries = {**self._entries, **self._on_disk()}
                entry = self._entries.get(rel)
        return str(entry[2]) if isinstance(entry, list) and entry[:2] == now and len(entry) > 2 else None

    def sha256(self, rel: str) -> str:
        """The checksum of ``root/rel``, read from the file when not remembered (blocking: call it
        in a thread)."""
        known = self.known(rel)
        if known is not None:
            return known
        digest = sha256_file(self.root / rel)
        self.remember(rel, digest)
        return digest

    def remember(self, rel: str, digest: str) -> None:
        """Record the checksum of ``root/rel`` as it is on disk now."""
        st = (self.root / rel).stat()
        with self._lock:
            self._entries = {**self._entries, **self._on_disk(), rel: [st.st_size, st.st_mtime_ns, digest]}
            if not self.persist:
                return
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(self._entries))
                os.replace(tmp, self.path)
            except OSError as e:  # a read-only models folder: hashing again costs time, not results
                log.warning("checksums of %s kept in memory only: %s", self.root, e)
                self.persist = False
