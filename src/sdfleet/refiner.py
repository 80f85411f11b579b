"""SD WebUI's refiner as a task asks for it: ``refiner_checkpoint`` and ``refiner_switch_at`` of
``params.extra`` (their SD WebUI 1.10 API names). Torch-free; the diffusers runtime hands the
denoising over (``runtimes/_diffusers_refiner.py``).

SD WebUI checks before each pass through the UNet how far the sampling has come, by the model's
own timesteps (``apply_refiner``): the index of the training sigma nearest the one being denoised
(DDIM, PLMS, UniPC: the timestep), as ``(999 - index) / 1000``. From the first pass where that
reaches ``refiner_switch_at`` (none given: from the first) the refiner's UNet denoises, its text
encoders read the prompts, and its VAE makes the images; the infotext then says ``Refiner`` and
``Refiner switch at``. Two of SD WebUI's options change that, given as the task's
``override_settings``: ``refiner_switch_by_sample_steps`` (the ratio is the passes made over
all the pass's sampling makes, ``total_steps``) and ``hires_fix_refiner_pass`` (with a hires fix,
the pass it refines: "second pass", its default, "first pass" or "both passes").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sdfleet.errors import Reject
from sdfleet.tasks import TaskParams

NONE = (None, "", "None", "none")
"""``refiner_checkpoint`` values that ask for no refiner (SD WebUI's)."""
WORDS = ("Refiner", "Refiner switch at")
PASSES = ("second pass", "first pass", "both passes")
"""``hires_fix_refiner_pass``'s values, its default first."""
PASS_OPTION, BY_STEPS_OPTION = "hires_fix_refiner_pass", "refiner_switch_by_sample_steps"
PASS_WORD, BY_STEPS_WORD = "Hires refiner", "Refiner switch by sampling steps"


@dataclass(frozen=True)
class Options:
    """SD WebUI's options of the refiner, as a task overrides them (``options``)."""

    passes: str = PASSES[0]
    """With a hires fix, the passes refined (``hires_fix_refiner_pass``)."""
    by_steps: bool = False
    """The switch reads the passes made, not the timestep (``refiner_switch_by_sample_steps``)."""

    def refines(self, second: bool) -> bool:
        """Whether a hires fix's first pass (``second`` False) or second pass is refined."""
        return self.passes == "both passes" or self.passes == ("second pass" if second else "first pass")


@dataclass(frozen=True)
class Refiner:
    checkpoint: str
    """As named: a title, file name or stem of the models folder."""
    switch_at: float | None
    """The completed ratio from which the refiner denoises; None: from the start."""
    options: Options = Options()


def read(params: TaskParams) -> Refiner | None:
    """The refiner a text- or image-to-image task asks for; None without one. ``Reject``
    (``invalid_params``) for a value that is no name, a switch that is no number from 0 to 1, or
    options that are not SD WebUI's (``options``)."""
    name = params.extra.get("refiner_checkpoint")
    chosen = options(params.extra)
    if name in NONE:
        return None
    if not isinstance(name, str):
        raise Reject(f"refiner_checkpoint must be a name, not {name!r}", code="invalid_params")
    at = params.extra.get("refiner_switch_at")
    if at is not None and (type(at) not in (int, float) or not math.isfinite(at) or not 0 <= at <= 1):
        raise Reject(f"refiner_switch_at must be a number from 0 to 1, not {at!r}", code="invalid_params")
    return Refiner(name, None if at is None else float(at), chosen)


def options(extra: dict[str, Any]) -> Options:
    """The refiner's options a task's ``override_settings`` sets; ``Reject`` (``invalid_params``)
    for a value SD WebUI does not offer (it would take any text as "both passes")."""
    overrides = extra.get("override_settings")
    overrides = overrides if isinstance(overrides, dict) else {}
    passes = overrides.get(PASS_OPTION, PASSES[0])
    if passes not in PASSES:
        raise Reject(
            f"override_settings.{PASS_OPTION} must be one of {', '.join(map(repr, PASSES))}, not {passes!r}",
            code="invalid_params",
        )
    by_steps = overrides.get(BY_STEPS_OPTION, False)
    if not isinstance(by_steps, bool):
        raise Reject(
            f"override_settings.{BY_STEPS_OPTION} must be true or false, not {by_steps!r}",
            code="invalid_params",
        )
    return Options(passes, by_steps)


def said_while_sampling(
    chosen: Options,
    etas: tuple[Mapping[str, Any], Mapping[str, Any]],
    refined: tuple[str, float | None] | None,
    passes: tuple[bool, bool],
    hires: bool,
    skips: tuple[Mapping[str, Any], Mapping[str, Any]] = ({}, {}),
) -> dict[str, Any]:
    """SD WebUI's words of a task said while it samples, in the order it says them: each pass's
    sampler's eta (``etas``: the first pass's, the hires pass's) as the pass starts, ``Refiner
    switch by sampling steps`` at the first pass through the UNet (a refiner or not), the words of
    the passes that left out the negative rows (``skips``: each pass's, NGMS's and Skip Early
    CFG's in the order first said), and where the refiner (``refined``: its short title and
    switch) took over a pass (``passes``: the first, the hires fix's second), ``Hires refiner``
    (not the default), ``Refiner`` and ``Refiner switch at`` then."""
    said = dict(etas[0])
    if chosen.by_steps:
        said[BY_STEPS_WORD] = True
    took: dict[str, Any] = {}
    if refined is not None:
        took = {PASS_WORD: chosen.passes} if hires and chosen.passes != PASSES[0] else {}
        took |= dict(zip(WORDS, refined, strict=True))
    said |= skips[0]
    if passes[0]:
        said |= took
    said |= etas[1]
    said |= skips[1]  # in place where the first pass said them
    if passes[1]:
        said |= took
    return said


def completed(index: float) -> float:
    """SD WebUI's completed ratio at the model's timestep ``index`` (0 … 999)."""
    return (999 - index) / 1000


def reached(ratio: float, switch_at: float | None) -> bool:
    return switch_at is None or ratio >= switch_at
