"""SD WebUI's latent fills for inpainting (``inpainting_fill`` 2 "latent noise" and 3 "latent
nothing"): the input's latents, inside the mask replaced by noise of the image's seed or by
zeros, handed to the inpainting pipeline instead of the input image. Imports torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sdfleet.runtimes._diffusers_pipes import inpainting_unet
from sdfleet.runtimes._inpaint_images import Canvas

LATENT_FILLS = (2, 3)


def latent_start(
    pipe: Any, canvases: Sequence[Canvas], fill: int, seeds: Sequence[int], size: tuple[int, int]
) -> dict[str, Any]:
    """The pipeline's ``image`` and ``masked_image_latents`` for ``fill`` (``LATENT_FILLS``): each
    canvas's image encoded as SD WebUI encodes it (a sample of the VAE's distribution, drawn with
    the image's seed, so the pipeline's own noise is the same as with the other fills), its
    repainted latent pixels then noise of the image's seed (2) or zero (3)."""
    width, height = size
    processor = pipe.image_processor
    pixels = processor.preprocess([c.image for c in canvases], height=height, width=width)
    pixels = pixels.to(device=pipe.device, dtype=pipe.vae.dtype)
    latents = pipe._encode_vae_image(pixels, generator=_generators(seeds))
    scale = pipe.vae_scale_factor
    # how much of each latent pixel is repainted: 0 or 1, or between with mask_round off (SD WebUI
    # blends the fill by its nmask, soft then too)
    shares = [np.asarray(c.mask, dtype=np.float32)[::scale, ::scale] / 255 for c in canvases]
    repaint = torch.from_numpy(np.stack(shares))
    repaint = repaint[:, None].to(device=latents.device, dtype=latents.dtype)
    if fill == 2:
        shape = tuple(latents.shape[1:])
        noise = torch.stack([torch.randn(shape, generator=g) for g in _generators(seeds)])
        latents = latents * (1 - repaint) + noise.to(latents.device, latents.dtype) * repaint
    else:
        latents = latents * (1 - repaint)
    masked = latents  # what a plain UNet is given (and does not read)
    if inpainting_unet(pipe):  # an inpainting UNet reads the masked input's pixels
        kept = pipe.mask_processor.preprocess([c.mask for c in canvases], height=height, width=width) < 0.5
        kept = kept.to(pixels.device, pixels.dtype)
        masked = pipe._encode_vae_image(pixels * kept, generator=_generators(seeds))
    return {"image": latents, "masked_image_latents": masked}


def round_masks(pipe: Any, on: bool) -> None:
    """SD WebUI's ``mask_round`` on the inpainting pipeline: diffusers' pipelines binarize their
    mask at 0.5; off, a mask processor that keeps its grey (the blend is soft there). Set before
    each masked call: the pipeline is cached and shared."""
    current = pipe.mask_processor
    if bool(current.config.do_binarize) != on:
        pipe.mask_processor = type(current).from_config({**current.config, "do_binarize": on})


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
