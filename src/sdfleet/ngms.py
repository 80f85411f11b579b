"""SD WebUI's two ways of leaving the negative prompt out of a pass through the UNet, as a task
asks for them: negative guidance minimum sigma (NGMS: ``s_min_uncond`` of ``params.extra``, and
the ``s_min_uncond_all`` option in its ``override_settings``) and the ``skip_early_cond`` option
("Skip Early CFG", in its ``override_settings`` too). Torch-free; the diffusers runtime skips the
rows (``runtimes/_diffusers_ngms.py``).

SD WebUI's CFG denoiser counts its passes through the UNet from 0 in each sampling (a hires fix's
second pass counts anew). On an odd pass (every pass with ``s_min_uncond_all``) whose sigma is
below ``s_min_uncond`` it leaves the negative prompt's rows out and takes the prompt's prediction
for the image's, as at CFG scale 1: half the UNet's work of that pass, near the end of the
sampling where the negative prompt changes little. DDIM, PLMS and UniPC compare their timestep
(0 … 999) where the others compare a sigma. From the first pass it skips, the infotext says
``NGMS`` (and ``NGMS all steps``). A value of 0 or less skips nothing.

``skip_early_cond`` is checked first, on every pass: a pass whose index over the sampling's
``total_steps`` (its steps, twice for a second-order sampler) is at most the option skips (so
every pass at 1 or more, and at least the first above 0); the infotext then says ``Skip Early
CFG``, the option as given. NGMS is checked only on the passes it leaves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sdfleet.errors import Reject
from sdfleet.tasks import TaskParams

FIELD, ALL_OPTION, EARLY_OPTION = "s_min_uncond", "s_min_uncond_all", "skip_early_cond"
WORD, ALL_WORD, EARLY_WORD = "NGMS", "NGMS all steps", "Skip Early CFG"


@dataclass(frozen=True)
class Skip:
    """Which passes leave the negative prompt out: the early ones (``early``: a share of the
    sampling's ``total_steps``), then those below ``below`` (a sigma, or a timestep for the timestep
    samplers; 0: none), every other one or (``every_pass``) all."""

    below: float = 0.0
    every_pass: bool = False
    early: float = 0
    """``skip_early_cond`` as given (said so in the infotext: SD WebUI says an integer as one)."""

    def skips(self, index: int, level: float, total: int) -> dict[str, Any] | None:
        """The infotext's words of the rule by which UNet pass ``index`` (from 0 in its sampling of
        ``total`` steps), at ``level``, skips; None where it does not."""
        if self.early != 0 and index / total <= self.early:
            return {EARLY_WORD: self.early}
        if (self.every_pass or index % 2 == 1) and self.below > 0 and level < self.below:
            return {WORD: self.below} | ({ALL_WORD: True} if self.every_pass else {})
        return None


def read(params: TaskParams) -> Skip | None:
    """The skips a task asks for; None for none (no ``s_min_uncond`` or 0 or less, and no
    ``skip_early_cond`` or 0 or less). ``Reject`` (``invalid_params``) for a value that is no finite
    number, or an ``s_min_uncond_all`` that is not true or false. An ``override_settings`` of
    ``s_min_uncond`` is not read here (and is refused as an override the runtime does not run):
    SD WebUI's API reads the field, else its stored option, before a request's overrides apply;
    ``runtime serve`` hands that option over as the field."""
    value = _number(params.extra.get(FIELD), FIELD)
    overrides = params.extra.get("override_settings")
    overrides = overrides if isinstance(overrides, dict) else {}
    every = overrides.get(ALL_OPTION, False)
    if not isinstance(every, bool):
        raise Reject(
            f"override_settings.{ALL_OPTION} must be true or false, not {every!r}", code="invalid_params"
        )
    early = _number(overrides.get(EARLY_OPTION), f"override_settings.{EARLY_OPTION}")
    below = float(value) if value is not None and value > 0 else 0.0
    first = early if early is not None and early > 0 else 0
    return Skip(below, every, first) if below or first else None


def _number(value: Any, name: str) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Reject(f"{name} must be a number, not {value!r}", code="invalid_params")
    return value
