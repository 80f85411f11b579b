"""A model's UNet config, and whether it is SDXL's refiner, read without loading the model: a
diffusers folder's (or a single file's config folder's) JSON files, else a ``.safetensors``
file's header (``family``). What lets a refiner of another shape, or SDXL's refiner named as a
task's model, be refused before it costs a load and a cache place. No torch."""

from __future__ import annotations

import json
from typing import Any

from sdfleet.models import family
from sdfleet.models.catalog import ModelInfo


def unet_config(info: ModelInfo) -> dict[str, Any] | None:
    """The UNet's config as its pipeline would load it; None where that cannot be read before
    loading (a pickled ``.ckpt``, a file this runtime does not load: the load says why)."""
    folder = info.path if info.kind == "diffusers" else info.config
    try:
        if folder is not None:
            config: dict[str, Any] = json.loads((folder / "unet" / "config.json").read_text("utf-8"))
            return config
        if info.path.suffix == ".safetensors":
            shapes = family.read_shapes(info.path)
            return family.unet_config(shapes, family.detect(shapes))
    except (OSError, ValueError, KeyError, StopIteration):  # UnsupportedCheckpoint is a ValueError
        return None
    return None


def sdxl_refiner(info: ModelInfo) -> bool:
    """Whether the model is SDXL's refiner (text encoder 2 alone), which refines SDXL models'
    tasks as their ``refiner_checkpoint``; False where that cannot be read before loading."""
    folder = info.path if info.kind == "diffusers" else info.config
    try:
        if folder is not None:
            index = json.loads((folder / "model_index.json").read_text("utf-8"))
            first, second = index.get("text_encoder") or [None], index.get("text_encoder_2") or [None]
            return first[0] is None and second[0] is not None
        if info.path.suffix == ".safetensors":
            return family.detect(family.read_shapes(info.path)) is family.Family.SDXL_REFINER
    except (OSError, ValueError, TypeError, IndexError):  # UnsupportedCheckpoint is a ValueError
        return False
    return False
