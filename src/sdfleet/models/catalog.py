"""The models a worker can load: diffusers folders and single-file checkpoints in one directory.

A single-file checkpoint ``X.safetensors`` may come with a sidecar ``X.config/`` folder (a diffusers
folder without weights: ``model_index.json``, component configs, tokenizer, scheduler); with it the
checkpoint loads offline. ``sdfleet-tiny.json`` in a model folder or sidecar marks a tiny test model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sdfleet.errors import NotFound

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
CONFIG_SUFFIX = ".config"
TINY_MARKER = "sdfleet-tiny.json"
_A1111_HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]\s*$")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    """Folder name, or file name with its suffix (as A1111 lists checkpoints)."""
    path: Path
    kind: Literal["diffusers", "single-file"]
    tiny: bool = False
    config: Path | None = None
    """For a single-file checkpoint: its sidecar diffusers config folder, when there is one."""

    @property
    def stem(self) -> str:
        return Path(self.name).stem if self.kind == "single-file" else self.name

    def tiny_note(self) -> str | None:
        """The note from the tiny-model marker, for result info; None for a real model."""
        if not self.tiny:
            return None
        where = self.path if self.kind == "diffusers" else self.config
        if where is None:
            return None
        try:
            note = json.loads((where / TINY_MARKER).read_text()).get("note")
        except (OSError, ValueError):
            return None
        return str(note) if note is not None else None


class ModelCatalog:
    """Lists and resolves the models under ``models_dir`` (read from disk on every call)."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)

    def list(self) -> list[ModelInfo]:
        if not self.models_dir.is_dir():
            return []
        found: list[ModelInfo] = []
        for entry in sorted(self.models_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() and not entry.name.endswith(CONFIG_SUFFIX):
                if (entry / "model_index.json").is_file():
                    tiny = (entry / TINY_MARKER).is_file()
                    found.append(ModelInfo(entry.name, entry, "diffusers", tiny=tiny))
            elif entry.is_file() and entry.suffix in SINGLE_FILE_SUFFIXES:
                sidecar = entry.with_name(entry.stem + CONFIG_SUFFIX)
                config = sidecar if (sidecar / "model_index.json").is_file() else None
                tiny = config is not None and (config / TINY_MARKER).is_file()
                found.append(ModelInfo(entry.name, entry, "single-file", tiny=tiny, config=config))
        return found

    def resolve(self, name: str) -> ModelInfo:
        """Find a model by exact name, else by stem (``x.safetensors`` finds folder ``x/`` and back).

        An A1111 title's hash suffix (``"x.safetensors [6ce0161689]"``) is ignored. Raises ``NotFound``.
        """
        models = self.list()
        wanted = _A1111_HASH.sub("", name).strip()
        for info in models:
            if info.name == wanted:
                return info
        wanted_stem = Path(wanted).stem if Path(wanted).suffix in SINGLE_FILE_SUFFIXES else wanted
        for info in models:
            if info.stem == wanted_stem:
                return info
        available = ", ".join(m.name for m in models) or "none"
        raise NotFound(f"model {name!r} not found in {self.models_dir} (available: {available})")


def default_model(configured: str | None, catalog: ModelCatalog | None) -> str | None:
    """The model a task that names none runs on: ``models.default`` when set, else the first model of
    the models folder by name (SD WebUI likewise loads its first checkpoint); None when the folder
    holds none or is not visible here (an API without the models volume leaves the choice to agents).

    The one rule for the API's check at submit and the agent's job building.
    """
    if configured:
        return configured
    models = catalog.list() if catalog is not None else []
    return models[0].name if models else None
