"""SD WebUI's negative guidance minimum sigma and Skip Early CFG (``sdfleet.ngms``) in a diffusers
pipeline call. Imports torch.

A guided call passes the negative prompt's rows and the prompt's through the UNet together and
mixes them as ``uncond + cfg × (cond − uncond)``. ``SkippingUNet`` stands in for the UNet during
the call: on a pass that skips it runs the prompt's rows alone and hands their prediction back
for both halves, which that mix turns into the prompt's own, as SD WebUI's denoiser takes it.
A pass's level is its scheduler's sigma then (the interpolated one of DPM2's second evaluation),
or for the timestep samplers its timestep, as SD WebUI reads each; its share of the sampling is
its index over SD WebUI's ``total_steps`` of the call (``total``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import KDPM2AncestralDiscreteScheduler

from sdfleet.ngms import Skip
from sdfleet.runtimes import _diffusers_composed as C
from sdfleet.runtimes import _diffusers_prompts as E
from sdfleet.runtimes._diffusers_samplers import by_timestep, total_of
from sdfleet.runtimes._instead import instead


def level(scheduler: Any, timestep: Any) -> float:
    """The level of the pass the UNet is given ``timestep`` for, read as ``scheduler`` reads it
    (its ``scale_model_input`` has run; DPM++'s sets its index at its first step)."""
    t = timestep.flatten()[0] if isinstance(timestep, torch.Tensor) else timestep
    if by_timestep(scheduler):
        return float(t)
    index = scheduler.step_index
    if index is None:
        index = (
            scheduler.begin_index if scheduler.begin_index is not None else scheduler.index_for_timestep(t)
        )
    if getattr(scheduler, "state_in_first_order", True) is False and hasattr(scheduler, "sigmas_interpol"):
        # DPM2's second evaluation, at the midpoint: where each scheduler's scale_model_input reads it
        shift = 1 if isinstance(scheduler, KDPM2AncestralDiscreteScheduler) else 0
        return float(scheduler.sigmas_interpol[index - shift])
    if getattr(scheduler, "state_in_first_order", True) is False and hasattr(scheduler, "mid_point_sigma"):
        return float(scheduler.mid_point_sigma)  # DPM++ SDE's second evaluation, at its midpoint
    return float(scheduler.sigmas[index])


Said = Callable[[dict[str, Any]], None]
"""Told the infotext's words of each pass skipped (``ngms.Skip.skips``)."""


def total(pipe: Any) -> int:
    """SD WebUI's ``total_steps`` of the call ``pipe`` is making (``total_of``)."""
    return total_of(pipe.scheduler, int(pipe.num_timesteps))


class SkippingUNet:
    """The UNet of a call that skips the negative prompt's rows where ``skip`` says (``on_skip``
    is told the words of each pass skipped). Its ``n``-th call is the call's ``n``-th pass through
    the UNet."""

    def __init__(self, unet: Any, pipe: Any, skip: Skip, on_skip: Said) -> None:
        self.unet, self.pipe, self.skip, self.on_skip = unet, pipe, skip, on_skip
        self.passes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unet, name)

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        index, self.passes = self.passes, self.passes + 1
        words = self.skip.skips(index, level(self.pipe.scheduler, timestep), total(self.pipe))
        if words is None:
            return self.unet(sample, timestep, *args, **kwargs)
        self.on_skip(words)  # said even where the call has no negative rows (CFG scale ≤ 1), as SD WebUI
        if not self.pipe.do_classifier_free_guidance:
            return self.unet(sample, timestep, *args, **kwargs)
        half = sample.shape[0] // 2  # the negative prompt's rows, then the prompt's
        out = self.unet(_rows(sample, half), _rows(timestep, half), *_rows(args, half), **_rows(kwargs, half))
        if isinstance(out, tuple):
            return (torch.cat([out[0], out[0]]), *out[1:])
        out.sample = torch.cat([out.sample, out.sample])
        return out


def _rows(value: Any, half: int) -> Any:
    """``value`` with the prompt's rows only: every tensor of ``2 × half`` rows in it (the
    embeddings, SDXL's added conditioning, a ControlNet's residuals) its second half."""
    if isinstance(value, torch.Tensor):
        return value[half:] if value.ndim and value.shape[0] == 2 * half else value
    if isinstance(value, dict):
        return {k: _rows(v, half) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_rows(v, half) for v in value)
    return value


@contextmanager
def skipping(pipe: Any, skip: Skip | None, on_skip: Said) -> Iterator[None]:
    """``SkippingUNet`` in ``pipe`` for the call where there is a ``skip``; nothing otherwise."""
    if skip is None:
        yield
        return
    with instead(pipe, "unet", SkippingUNet(pipe.unet, pipe, skip, on_skip)):
        yield


@contextmanager
def stand_ins(
    pipe: Any,
    kwargs: dict[str, Any],
    read: C.Pass,
    images: int,
    reading: E.Reading,
    skip: Skip | None,
    on_skip: Said,
) -> Iterator[None]:
    """What stands in for the UNet of a call (``kwargs``, its arguments) of a pass (``read``):
    composable diffusion's (``_diffusers_composed.composing``), the skips of NGMS and Skip Early
    CFG (never both: a task asking for both is refused)."""
    with C.composing(pipe, read, images, kwargs, reading), skipping(pipe, skip, on_skip):
        yield
