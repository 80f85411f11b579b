"""Files in a models folder's sub-folders (``Lora/``, ``embeddings/`` …), read from disk on each
call so that files added while an agent runs are found without a restart. Imports nothing heavy."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path


def files_under(folder: Path, suffixes: Collection[str]) -> list[Path]:
    """Files under ``folder``, sub-folders included, whose suffix (in any case) is one of
    ``suffixes`` (lower case), sorted by path; none where ``folder`` is not a folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
