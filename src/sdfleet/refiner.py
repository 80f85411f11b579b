"""SD WebUI's refiner as a task asks for it: ``refiner_checkpoint`` and ``refiner_switch_at`` of
``params.extra`` (their SD WebUI 1.10 API names). Torch-free; the diffusers runtime hands the
denoising over (``runtimes/_diffusers_refiner.py``).

SD WebUI checks before each pass through the UNet how far the sampling has come, by the model's
own timesteps (``apply_refiner``): the index of the training sigma nearest the one being denoised
(DDIM, PLMS, UniPC: the timestep), as ``(999 - index) / 1000``. From the first pass where that
reaches ``refiner_switch_at`` (none given: from the first) the refiner's UNet denoises, its text
encoders read the prompts, and its VAE makes the images; the infotext then says ``Refiner`` and
``Refiner switch at``. With a hires fix it refines the second pass only (SD WebUI's default
``hires_fix_refiner_pass``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sdfleet.errors import Reject
from sdfleet.tasks import TaskParams

NONE = (None, "", "None", "none")
"""``refiner_checkpoint`` values that ask for no refiner (SD WebUI's)."""
WORDS = ("Refiner", "Refiner switch at")


@dataclass(frozen=True)
class Refiner:
    checkpoint: str
    """As named: a title, file name or stem of the models folder."""
    switch_at: float | None
    """The completed ratio from which the refiner denoises; None: from the start."""


def read(params: TaskParams) -> Refiner | None:
    """The refiner a text- or image-to-image task asks for (with a hires fix, for its second
    pass); None without one. ``Reject`` (``invalid_params``) for a value
    that is no name, or a switch that is no number from 0 to 1."""
    name = params.extra.get("refiner_checkpoint")
    if name in NONE:
        return None
    if not isinstance(name, str):
        raise Reject(f"refiner_checkpoint must be a name, not {name!r}", code="invalid_params")
    at = params.extra.get("refiner_switch_at")
    if at is not None and (type(at) not in (int, float) or not math.isfinite(at) or not 0 <= at <= 1):
        raise Reject(f"refiner_switch_at must be a number from 0 to 1, not {at!r}", code="invalid_params")
    return Refiner(name, None if at is None else float(at))


def completed(index: float) -> float:
    """SD WebUI's completed ratio at the model's timestep ``index`` (0 … 999)."""
    return (999 - index) / 1000


def reached(ratio: float, switch_at: float | None) -> bool:
    return switch_at is None or ratio >= switch_at
