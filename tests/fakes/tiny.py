"""A diffusers runtime on CPU over one tiny model made locally (no hub download)."""

from __future__ import annotations

import shutil
from pathlib import Path

from sdfleet.models import ModelCatalog, make_tiny
from sdfleet.runtimes._styles import FILE
from sdfleet.runtimes.diffusers import DiffusersRuntime

STYLES = Path(__file__).resolve().parents[1] / "data" / "styles.csv"
"""SD WebUI's styles file of the styles tests (SD WebUI's interop server reads it too)."""


def tiny_diffusers(root: Path, *, styles: bool = False) -> DiffusersRuntime:
    """The runtime, its models folder ``root`` holding ``tiny-a`` (made here, seed 0) and, with
    ``styles``, ``STYLES`` as its ``styles.csv``."""
    make_tiny(root, "tiny-a", seed=0)
    if styles:
        shutil.copy(STYLES, root / FILE)
    return DiffusersRuntime(ModelCatalog(root), default_model="tiny-a", device="cpu")


async def no_progress(value: float) -> None:
    return None


def with_inpainting_unet(folder: Path) -> Path:
    """The tiny model in ``folder`` given an inpainting UNet (9 input channels: the latents, the
    mask and the masked input's latents), random like the rest."""
    import torch
    from diffusers import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(folder / "unet")) | {"in_channels": 9}
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    return folder
