"""The models a worker can load: diffusers folders and single-file checkpoints in one directory.

A single-file checkpoint ``X.safetensors`` may come with a sidecar ``X.config/`` folder (a diffusers
folder without weights: ``model_index.json``, component configs, tokenizer, scheduler); with it the
checkpoint loads offline. ``sdfleet-tiny.json`` in a model folder or sidecar marks a tiny test model.

With a ``ModelFetcher`` (``models.s3`` set), ``fetch`` brings a model that is not on disk from S3.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sdfleet.errors import NotFound, one_line
from sdfleet.models.tiny import MARKER, file_marker, is_tiny

if TYPE_CHECKING:
    from sdfleet.models.fetcher import ModelFetcher

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
CONFIG_SUFFIX = ".config"
TINY_MARKER = MARKER
HOW_TO_ADD = "`sdfleet models make-tiny NAME`, `sdfleet models pull`, or models.s3"
"""The ways to put a model in an empty models folder, for the messages that find one."""


def folder_named(models_dir: Path) -> str:
    """A models folder as the messages that find it empty name it: a typo in ``models.dir`` reads
    as "(the folder does not exist)", not as a folder someone forgot to fill."""
    return str(models_dir) if models_dir.is_dir() else f"{models_dir} (the folder does not exist)"


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
        if where is None:  # a single file without its config folder carries the marker itself
            note = (file_marker(self.path) or {}).get("note")
            return str(note) if note is not None else None
        try:
            note = json.loads((where / TINY_MARKER).read_text()).get("note")
        except (OSError, ValueError):
            return None
        return str(note) if note is not None else None


class ModelCatalog:
    """Lists and resolves the models under ``models_dir`` (read from disk on every call)."""

    def __init__(self, models_dir: Path, fetcher: ModelFetcher | None = None) -> None:
        self.models_dir = Path(models_dir)
        self.fetcher = fetcher

    async def fetch(self, name: str) -> tuple[ModelInfo, float]:
        """``resolve(name)``, first downloading the model from S3 when it is not on disk and a
        fetcher is set; and the seconds that took (0.0 when it was there). Raises ``NotFound``
        when neither has it, or the fetcher's errors (``StorageError``, ``DiskFull``, ...)."""
        if self.fetcher is None:
            return self.resolve(name), 0.0
        started = time.monotonic()
        try:
            info = self.resolve(name)
        except NotFound as e:
            info = await self._pull(name, e)
            return info, time.monotonic() - started
        self.fetcher.use(info.name)
        if not info.path.exists():  # evicted by another process before this one held it
            info = await self._pull(name, NotFound(f"model {name!r} was evicted"))
            return info, time.monotonic() - started
        return info, 0.0

    async def _pull(self, name: str, missing: NotFound) -> ModelInfo:
        assert self.fetcher is not None
        try:
            await self.fetcher.pull(name)
        except NotFound as e:
            raise NotFound(f"{missing.message}; {e.message}") from e
        info = self.resolve(name)
        self.fetcher.use(info.name)
        return info

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
                tiny = (config / TINY_MARKER).is_file() if config is not None else is_tiny(entry)
                found.append(ModelInfo(entry.name, entry, "single-file", tiny=tiny, config=config))
        return found

    def resolve(self, name: str) -> ModelInfo:
        """Find a model by exact name, else by stem (``x.safetensors`` finds folder ``x/`` and back).

        An A1111 title's hash suffix (``"x.safetensors [6ce0161689]"``) is ignored. Raises ``NotFound``.
        """
        models = self.list()
        found = match_name(name, [m.name for m in models])
        if found is not None:
            return next(m for m in models if m.name == found)
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


def _stem(name: str) -> str:
    return Path(name).stem if Path(name).suffix in SINGLE_FILE_SUFFIXES else name


def unreadable(info: ModelInfo) -> str | None:
    """Why ``info`` cannot be a model, as far as a glance tells (a folder's ``model_index.json``, a
    ``.safetensors`` header: a copy cut short, a file that is not one), or None. Not a load: a
    model that passes can still fail to load, and one being copied in may heal."""
    try:
        if info.kind == "diffusers":
            json.loads((info.path / "model_index.json").read_text())
        elif info.path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(info.path), "np"):
                pass
    except Exception as e:  # whatever the reader raises is the reason
        return one_line(e)
    return None


def match_name(name: str, names: list[str]) -> str | None:
    """The entry of ``names`` that ``name`` asks for: exact, else by stem (``x.safetensors`` finds
    ``x`` and back); an A1111 title's hash suffix is ignored. None when there is none."""
    wanted = _A1111_HASH.sub("", name).strip()
    if wanted in names:
        return wanted
    return next((n for n in names if _stem(n) == _stem(wanted)), None)
