"""SD WebUI's view of the models folder: titles, short and full sha256, as ``/sd-models`` lists them.

Like SD WebUI, a checkpoint is hashed when it is first loaded (reading a multi-GB file costs
seconds), and listed without a hash before that unless its hash is remembered (SD WebUI's
``cache.json``; here the models folder's checksum cache, ``models.checkpoint_hash``): title
``"<file>"``, ``hash`` and ``sha256`` null. Once hashed its title is ``"<file> [<first 10 hex of
sha256>]"``. Diffusers folders, which SD WebUI does not list at all, are listed too; their hash
covers ``model_index.json`` and the file listing.
"""

from __future__ import annotations

from typing import Any

from sdfleet.errors import NotFound, Reject
from sdfleet.models import checkpoint_hash
from sdfleet.models.catalog import ModelCatalog, ModelInfo
from sdfleet.models.checkpoint_hash import SHORT


class Checkpoints:
    """Titles and hashes of the catalog's models (``models.checkpoint_hash``)."""

    def __init__(self, catalog: ModelCatalog) -> None:
        self.catalog = catalog

    def hash(self, info: ModelInfo) -> str:
        """The full sha256, computed now if needed. Blocking: call in a thread."""
        return checkpoint_hash.sha256(info)

    def known_hash(self, info: ModelInfo) -> str | None:
        return checkpoint_hash.known(info)

    def title(self, info: ModelInfo) -> str:
        sha = self.known_hash(info)
        return f"{info.name} [{sha[:SHORT]}]" if sha else info.name

    def items(self) -> list[dict[str, Any]]:
        out = []
        for info in self.catalog.list():
            sha = self.known_hash(info)
            out.append(
                {
                    "title": self.title(info),
                    "model_name": info.stem,
                    "hash": sha[:SHORT] if sha else None,
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
            for info in self.catalog.list() if len(wanted) in (SHORT, 64) else ():
                sha = self.known_hash(info)
                if sha is not None and wanted in (sha, sha[:SHORT]):
                    return info
            raise Reject(f"model {name!r} not found", code="unknown_model") from e

    def first(self) -> ModelInfo | None:
        """The first model of the folder (sorted by name), as SD WebUI picks one at start."""
        models = self.catalog.list()
        return models[0] if models else None
