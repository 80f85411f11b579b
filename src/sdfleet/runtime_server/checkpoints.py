"""SD WebUI's view of the models folder: titles, short and full sha256, as ``/sd-models`` lists them.

Like SD WebUI, a checkpoint is hashed when it is first loaded (reading a multi-GB file costs
seconds), and listed without a hash before that: title ``"<file>"``, ``hash`` and ``sha256`` null.
Once hashed its title is ``"<file> [<first 10 hex of sha256>]"``. Diffusers folders, which SD WebUI
does not list at all, are listed too; their hash covers ``model_index.json`` and the file listing.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from sdfleet.errors import NotFound, Reject
from sdfleet.models.catalog import ModelCatalog, ModelInfo

_CHUNK = 1 << 20


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_sha256(path: Path) -> str:
    digest = hashlib.sha256((path / "model_index.json").read_bytes())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path)}\0{f.stat().st_size}\n".encode())
    return digest.hexdigest()


class Checkpoints:
    """Titles and hashes of the catalog's models; hashes are kept per (path, size, mtime)."""

    def __init__(self, catalog: ModelCatalog) -> None:
        self.catalog = catalog
        self._hashes: dict[tuple[str, int, float], str] = {}
        self._lock = threading.Lock()

    def _key(self, info: ModelInfo) -> tuple[str, int, float]:
        stat = info.path.stat()
        return (str(info.path), stat.st_size, stat.st_mtime)

    def hash(self, info: ModelInfo) -> str:
        """The full sha256, computed now if needed. Blocking: call in a thread."""
        key = self._key(info)
        with self._lock:
            known = self._hashes.get(key)
        if known is None:
            known = _folder_sha256(info.path) if info.kind == "diffusers" else _file_sha256(info.path)
            with self._lock:
                self._hashes[key] = known
        return known

    def known_hash(self, info: ModelInfo) -> str | None:
        try:
            key = self._key(info)
        except OSError:
            return None
        with self._lock:
            return self._hashes.get(key)

    def title(self, info: ModelInfo) -> str:
        sha = self.known_hash(info)
        return f"{info.name} [{sha[:10]}]" if sha else info.name

    def items(self) -> list[dict[str, Any]]:
        out = []
        for info in self.catalog.list():
            sha = self.known_hash(info)
            out.append(
                {
                    "title": self.title(info),
                    "model_name": info.stem,
                    "hash": sha[:10] if sha else None,
                    "sha256": sha,
                    # As SD WebUI lists it: the path in the folder, not resolved through links.
                    "filename": str(info.path.absolute()),
                    "config": None,
                }
            )
        return out

    def resolve(self, name: str) -> ModelInfo:
        """A checkpoint by title, file name or stem, or by its sha256 or short hash once known (SD
        WebUI's ``checkpoint_aliases`` hold the hashes it has computed: the ``hash`` a client read
        from ``sd-models`` or a PNG's "Model hash"); ``Reject`` (unknown_model) in SD WebUI's words."""
        try:
            return self.catalog.resolve(name)
        except NotFound as e:
            wanted = name.strip().lower()
            for info in self.catalog.list() if len(wanted) in (10, 64) else ():
                sha = self.known_hash(info)
                if sha is not None and wanted in (sha, sha[:10]):
                    return info
            raise Reject(f"model {name!r} not found", code="unknown_model") from e

    def first(self) -> ModelInfo | None:
        """The first model of the folder (sorted by name), as SD WebUI picks one at start."""
        models = self.catalog.list()
        return models[0] if models else None
