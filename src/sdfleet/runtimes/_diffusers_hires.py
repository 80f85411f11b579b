"""The hires fix's second pass in the diffusers runtime (``sdfleet.hires`` reads what a task asks
for). Imports torch.

The first pass makes latents (``Latent`` upscalers: they are interpolated) or images (any other
upscaler: resized by it, then encoded again by the image-to-image pipeline); the second pass
denoises them as image-to-image at the plan's strength, with fresh noise from the same seeds, as
SD WebUI does, on the model ``hr_checkpoint_name`` names where it names another (the first pass's
latents handed over as they are, or its images encoded by that model's VAE, as there). Its steps
are exactly the plan's, the last of a schedule about ``steps / strength`` long, as SD WebUI's
sampler makes it (``_diffusers_samplers.hires_schedule``). On an inpainting checkpoint the pass
is given the whole image masked, as SD WebUI gives it (``_diffusers_inpaint.whole_masked``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from sdfleet.hires import Hires
from sdfleet.runtimes._diffusers_churn import ready
from sdfleet.runtimes._diffusers_inpaint import whole_masked
from sdfleet.runtimes._diffusers_noise import as_sd_webui
from sdfleet.runtimes._diffusers_pipes import inpainting_unet
from sdfleet.runtimes._diffusers_samplers import hires_schedule

Upscale = Callable[[Image.Image, str, tuple[int, int]], Image.Image]
"""An image upscaler by name, to an exact size (the runtime's extras upscalers)."""


@dataclass
class SecondPass:
    pipe: Any
    """The image-to-image pipeline of the pass's model, its scheduler set for this pass."""
    plan: Hires
    upscale: Upscale
    sampler: str | None = None
    """The pass's sampler (a ``SAMPLERS`` key; None: the model's own scheduler)."""
    other_model: bool = False
    """The pass runs another model than the first pass's (``hr_checkpoint_name``): its own text
    encoders read the prompts again."""


def first_output(second: SecondPass) -> str:
    """What the first pass hands over: latents or images."""
    return "latent" if second.plan.latent_mode else "pil"


TakeOver = Callable[[Any, int, dict[str, Any]], Any]
"""Readies a call's arguments for a refiner: (pipeline, steps, arguments) → what to give back."""


def run(
    second: SecondPass,
    first: Any,
    kwargs: dict[str, Any],
    seeds: list[int],
    callback: Any,
    take_over: TakeOver | None = None,
    around: Callable[..., AbstractContextManager[None]] | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[list[Any], bool]:
    """The second pass over ``first`` (the first call's output), with the first call's prompt
    arguments (``kwargs``); its images, and whether a refiner (``take_over``) took it over.
    ``around(pipe, kwargs=...)``: what the call runs in (composable diffusion's UNet); ``noise``:
    its starting noise where it is not the pipeline's own (variation seeds)."""
    plan = second.plan
    if plan.latent_mode is not None:
        mode, antialias = plan.latent_mode
        size = (plan.latent_height, plan.latent_width)
        latents = torch.nn.functional.interpolate(first, size=size, mode=mode, antialias=antialias)
        image: Any = _crop(latents, plan)
    else:
        full = (plan.latent_width * 8, plan.latent_height * 8)
        image = [_crop_image(second.upscale(im, plan.upscaler, full), plan) for im in first]
    skip = ("width", "height", "output_type", "generator", "callback_on_step_end", "mask_image")
    call = {k: v for k, v in kwargs.items() if k not in skip}
    schedule, strength = hires_schedule(second.sampler, plan.steps, plan.denoising)
    if inpainting_unet(second.pipe):
        call |= whole_masked(second.pipe, plan.size, seeds, latents=plan.latent_mode is not None)
        if strength >= 1 > plan.denoising:  # there: noise alone, not the image noised
            schedule, strength = hires_schedule(None, plan.steps, plan.denoising)  # diffusers' own
    call.update(
        image=image,
        strength=strength,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        callback_on_step_end=callback,
        output_type="pil",
    )
    ready(second.pipe.scheduler, call, schedule)
    swap = take_over(second.pipe, schedule, call) if take_over is not None else None
    try:
        with (
            as_sd_webui(second.pipe, call, seeds, noise),
            around(second.pipe, kwargs=call) if around is not None else nullcontext(),
        ):
            images: list[Any] = second.pipe(num_inference_steps=schedule, **call).images
    finally:
        if swap is not None:
            swap.give_back(second.pipe)
    return images, swap is not None


def _crop(latents: torch.Tensor, plan: Hires) -> torch.Tensor:
    """SD WebUI's crop of an ``hr_resize`` at another aspect ratio: half each side."""
    h, w = latents.shape[2], latents.shape[3]
    top, left = plan.crop_y // 2, plan.crop_x // 2
    return latents[:, :, top : h - (plan.crop_y + 1) // 2, left : w - (plan.crop_x + 1) // 2]


def _crop_image(image: Image.Image, plan: Hires) -> Image.Image:
    if not plan.crop_x and not plan.crop_y:
        return image
    left, top = plan.crop_x // 2 * 8, plan.crop_y // 2 * 8
    return image.crop((left, top, left + plan.size[0], top + plan.size[1]))
