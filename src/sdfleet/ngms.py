"""SD WebUI's negative guidance minimum sigma (NGMS) as a task asks for it: ``s_min_uncond`` of
``params.extra``, and the ``s_min_uncond_all`` option in its ``override_settings``. Torch-free;
the diffusers runtime skips the rows (``runtimes/_diffusers_ngms.py``).

SD WebUI's CFG denoiser counts its passes through the UNet from 0 in each sampling (a hires fix's
second pass counts anew). On an odd pass (every pass with ``s_min_uncond_all``) whose sigma is
below ``s_min_uncond`` it leaves the negative prompt's rows out and takes the prompt's prediction
for the image's, as at CFG scale 1: half the UNet's work of that pass, near the end of the
sampling where the negative prompt changes little. DDIM, PLMS and UniPC compare their timestep
(0 … 999) where the others compare a sigma. From the first pass it skips, the infotext says
``NGMS`` (and ``NGMS all steps``). A value of 0 or less skips nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sdfleet.errors import Reject
from sdfleet.tasks import TaskParams

FIELD, ALL_OPTION = "s_min_uncond", "s_min_uncond_all"
WORD, ALL_WORD = "NGMS", "NGMS all steps"


@dataclass(frozen=True)
class Skip:
    """Which passes leave the negative prompt out: those below ``below`` (a sigma, or a timestep
    for the timestep samplers), every other one or (``every_pass``) all."""

    below: float
    every_pass: bool = False

    def skips(self, index: int, level: float) -> bool:
        """Whether UNet pass ``index`` (from 0 in its sampling), at ``level``, skips."""
        return (self.every_pass or index % 2 == 1) and level < self.below

    def words(self) -> dict[str, Any]:
        """The infotext's words, said at the first pass skipped."""
        return {WORD: self.below} | ({ALL_WORD: True} if self.every_pass else {})


def read(params: TaskParams) -> Skip | None:
    """The skip a task asks for; None for none (no ``s_min_uncond``, or 0 or less). ``Reject``
    (``invalid_params``) for a value that is no finite number, or an ``s_min_uncond_all`` that is
    not true or false. An ``override_settings`` of ``s_min_uncond`` is not read here (and is refused
    as an override the runtime does not run): SD WebUI's API reads the field, else its stored
    option, before a request's overrides apply; ``runtime serve`` hands that option over as the
    field."""
    value = params.extra.get(FIELD)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Reject(f"{FIELD} must be a number, not {value!r}", code="invalid_params")
    overrides = params.extra.get("override_settings")
    every = overrides.get(ALL_OPTION, False) if isinstance(overrides, dict) else False
    if not isinstance(every, bool):
        raise Reject(
            f"override_settings.{ALL_OPTION} must be true or false, not {every!r}", code="invalid_params"
        )
    return Skip(float(value), every) if value > 0 else None
