"""Inpainting with SD WebUI's timestep samplers (DDIM, PLMS, UniPC). Imports torch.

SD WebUI 1.10 runs them with ``CFGDenoiserTimesteps``, whose ``mask_before_denoising`` gives the
model, before each evaluation, the input's latents un-noised where the mask keeps the image and
the sampler's own where it repaints (``x * nmask + init_latent * mask``); its k-diffusion samplers
blend the model's denoised output instead, which keeps the kept latents on their noised path, as
diffusers' inpainting pipelines do for a plain UNet (they put them back there after each step).
For the timestep samplers the model's input differs: the kept latents noised there, un-noised in
SD WebUI (masked DDIM 3.7 of 255 from SD WebUI's image, UniPC 2.8). ``kept_as_sd_webui`` gives the
model SD WebUI's input: the call's scheduler's ``scale_model_input`` (where the pipeline makes the
model's input each step; the identity for these samplers) blends the input's latents in by the
call's latent mask, both as the pipeline prepared them. The sampler's own latents are left as the
pipeline keeps them: each step is elementwise, so the kept latents reach the repainted ones only
through the model, and the last step leaves the kept latents un-noised, as SD WebUI's final blend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from sdfleet.runtimes._diffusers_pipes import inpainting_unet
from sdfleet.runtimes._instead import instead

BLENDING = frozenset({"DDIM", "PLMS", "UniPC"})
"""SD WebUI's samplers that run with ``CFGDenoiserTimesteps`` (``mask_before_denoising``)."""


@contextmanager
def kept_as_sd_webui(pipe: Any, call: dict[str, Any], sampler: str | None) -> Iterator[None]:
    """For one call of ``pipe`` (its arguments ``call``) with ``sampler`` (a ``SAMPLERS`` key),
    the model given SD WebUI's input where it is a masked call of a plain UNet with one of
    ``BLENDING``; nothing changes otherwise (an inpainting UNet reads the masked input itself)."""
    if sampler not in BLENDING or "mask_image" not in call or inpainting_unet(pipe):
        yield
        return
    held: dict[str, torch.Tensor] = {}

    def prepare_latents(*args: Any, **kwargs: Any) -> Any:
        made = latents(*args, **kwargs)
        if isinstance(made, tuple) and len(made) == 3:  # latents, noise, the input's latents
            held["input"] = made[2]
        return made

    def prepare_mask_latents(*args: Any, **kwargs: Any) -> Any:
        mask, masked = masks(*args, **kwargs)
        held["mask"] = mask  # 1 where it repaints; its rows doubled for CFG, as the model's input
        return mask, masked

    latents, masks, scale = pipe.prepare_latents, pipe.prepare_mask_latents, pipe.scheduler.scale_model_input
    with (
        instead(pipe, "prepare_latents", prepare_latents),
        instead(pipe, "prepare_mask_latents", prepare_mask_latents),
        instead(pipe.scheduler, "scale_model_input", _blending(scale, held)),
    ):
        yield


def _blending(
    scale: Callable[..., torch.Tensor], held: dict[str, torch.Tensor]
) -> Callable[..., torch.Tensor]:
    def scale_model_input(sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scaled = scale(sample, *args, **kwargs)
        given, repaint = held.get("input"), held.get("mask")
        if given is None or repaint is None:
            return scaled
        rows = scaled.shape[0]
        given = torch.cat([given] * (rows // given.shape[0])).to(scaled.device, scaled.dtype)
        repaint = torch.cat([repaint] * (rows // repaint.shape[0])).to(scaled.device, scaled.dtype)
        return scaled * repaint + given * (1 - repaint)

    return scale_model_input
