"""SD WebUI's textual inversion embeddings in the diffusers runtime. Imports torch.

Files in ``<models>/embeddings/`` (sub-folders too): ``.pt`` and ``.bin`` (read with
``torch.load(weights_only=True)``: tensors and plain data, never code), ``.safetensors``, and
images that SD WebUI's training saved an embedding in (``_ti_images``), in SD WebUI 1.10's
formats: an A1111 embedding (``string_to_param``), a diffusers concept (one tensor),
``emb_params``, and SDXL's ``clip_l`` + ``clip_g``. An embedding is named by its file's stem (an
image's by the name inside it, where it has one); a prompt uses it by writing the name, which SD
WebUI finds among the prompt's tokens (so in any case, and inside emphasis:
``(EasyNegative:1.2)``). Its vectors take the places of the name's tokens, as many as it has, in
one 75-token chunk (``_prompt_syntax.chunk``), and go into the text encoder in place of those
tokens' own embeddings (SD WebUI's ``EmbeddingsWithFixes``). An embedding made for another model
family (another width) is left out, as SD WebUI skips it: its name is then read as words.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdfleet.runtimes import _prompt_syntax as S
from sdfleet.runtimes import _ti_images as TI
from sdfleet.runtimes._model_files import files_under

log = logging.getLogger(__name__)

SHORT = 12
"""Hex digits of an embedding's hash in ``TI hashes`` (SD WebUI's ``shorthash``)."""
FOLDER = "embeddings"
SUFFIXES = (".pt", ".bin", ".safetensors", *TI.SUFFIXES)
_XL_KEYS = ("clip_l", "clip_g")
"""An SDXL embedding's vectors for the first and the second text encoder."""


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: tuple[torch.Tensor, ...]
    """One (vectors, width) tensor per text encoder it is for: one, or SDXL's two."""
    step: int | None = None
    """What an A1111 file says of its training (SD WebUI lists it), else None."""
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    hash: str | None = None
    """SD WebUI's: the sha256 of its file (``TI hashes`` says ``SHORT`` hex digits of it)."""

    @property
    def count(self) -> int:
        return int(self.vectors[0].shape[0])

    @property
    def widths(self) -> list[int]:
        """The width of each text encoder it is for (SD 1.x, 2.x and SDXL differ)."""
        return [int(v.shape[-1]) for v in self.vectors]

    @property
    def shape(self) -> int:
        """SD WebUI's ``shape``: the width of its vectors (SDXL's two added)."""
        return sum(self.widths)


def read(path: Path) -> Embedding | None:
    """The embedding in ``path``; None (and a log line) for a file in no format SD WebUI reads;
    None, said at debug level, for an image that holds none (a preview)."""
    name = path.stem
    try:
        suffix = path.suffix.lower()
        if suffix in TI.SUFFIXES:
            data: Any = TI.read(path)
            if data is None:
                log.debug("%s holds no textual inversion embedding (a preview image)", path)
                return None
            inside = data.get("name")
            name = inside if isinstance(inside, str) and inside else name
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
        vectors = _vectors(data)  # a dict of SD WebUI's formats, from here
        trained = {k: data.get(k) for k in ("step", "sd_checkpoint", "sd_checkpoint_name")}
        digest = hashlib.sha256(path.read_bytes()).hexdigest()  # a few KB: read once per change
        return Embedding(name, vectors, **{k: v for k, v in trained.items() if _plain(v)}, hash=digest)
    except Exception as e:  # a bad file is skipped, as SD WebUI skips it, not the task failed
        log.warning("textual inversion embedding %s not read: %s", path, e)
        return None


def _vectors(data: Any) -> tuple[torch.Tensor, ...]:
    if not isinstance(data, dict):
        raise ValueError("neither a textual inversion embedding nor a diffusers concept")
    if "string_to_param" in data:
        params: Any = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError("embedding file has multiple terms in it")
        return (_float(next(iter(params.values()))),)
    if all(key in data for key in _XL_KEYS):
        return tuple(_float(data[key]) for key in _XL_KEYS)
    tensors = [value for value in data.values() if isinstance(value, torch.Tensor)]
    if len(data) != 1 or len(tensors) != 1:
        raise ValueError("neither a textual inversion embedding nor a diffusers concept")
    vector = tensors[0]
    return (_float(vector.unsqueeze(0) if vector.ndim == 1 else vector),)


@dataclass(frozen=True)
class Placed:
    """What a finder found at a place of a prompt: the vectors for its text encoder, and whose."""

    vectors: torch.Tensor
    embedding: Embedding


def _plain(value: Any) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def _float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(dtype=torch.float32)


class Embeddings:
    """The embeddings folder of a models folder, read again when a file in it changes."""

    def __init__(self, models_dir: Path) -> None:
        self.folder = models_dir / FOLDER
        self._seen: dict[Path, tuple[float, Embedding | None]] = {}

    def all(self) -> list[Embedding]:
        """Every embedding of the folder that reads, by name (the first file of a name wins)."""
        found: dict[str, Embedding] = {}
        for path in files_under(self.folder, SUFFIXES):
            if TI.is_preview(path):
                continue
            mtime = path.stat().st_mtime
            seen = self._seen.get(path)
            if seen is None or seen[0] != mtime:
                seen = (mtime, read(path))
                self._seen[path] = seen
            if seen[1] is not None:
                found.setdefault(seen[1].name, seen[1])
        return list(found.values())

    def finder(self, encoders: list[Any], index: int, ids: Callable[[str], list[int]]) -> S.Find | None:
        """``_prompt_syntax.chunk``'s ``find`` for the ``index``-th of a pipeline's text
        ``encoders``: the embeddings made for them (a vector set each, of each one's width), by
        their names' tokens; None when there are none."""
        widths = widths_of(encoders)
        lookup: dict[int, list[tuple[list[int], Embedding]]] = {}
        for embedding in self.all():
            if embedding.widths != widths:
                continue  # another model family's: its name stays words, as SD WebUI leaves it
            name = ids(embedding.name)
            if name:
                lookup.setdefault(name[0], []).append((name, embedding))
        if not lookup:
            return None
        for matches in lookup.values():
            matches.sort(key=lambda match: len(match[0]), reverse=True)

        def find(tokens: list[int], position: int) -> tuple[Any, int, int] | None:
            for name, embedding in lookup.get(tokens[position], []):
                if tokens[position : position + len(name)] == name:
                    return Placed(embedding.vectors[index], embedding), embedding.count, len(name)
            return None

        return find


def widths_of(encoders: list[Any]) -> list[int]:
    """The widths of text encoders' token embeddings."""
    return [int(encoder.get_input_embeddings().embedding_dim) for encoder in encoders]


@contextmanager
def placed(encoder: Any, slots: list[tuple[int, Placed]]) -> Iterator[None]:
    """While inside, ``encoder`` reads the embeddings' vectors in their chunk's places (after the
    start token) instead of the placeholder tokens' own embeddings."""
    if not slots:
        yield
        return

    def put(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        for offset, slot in slots:
            vectors = slot.vectors
            n = min(out.shape[1] - offset - 1, vectors.shape[0])
            out[:, offset + 1 : offset + 1 + n] = vectors[:n].to(device=out.device, dtype=out.dtype)
        return out

    handle = encoder.get_input_embeddings().register_forward_hook(put)
    try:
        yield
    finally:
        handle.remove()
