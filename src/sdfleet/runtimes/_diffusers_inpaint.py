"""Inpainting's pipeline arguments: a masked job's inputs made ready (``prepare``: its canvases,
image work before the device is waited for), the arguments of a call of masked jobs
(``call_args``) or of an inpainting UNet's job without a mask (``unmasked``), and SD WebUI's
latent fills (``inpainting_fill`` 2 "latent noise" and 3 "latent nothing": the input's latents,
inside the mask replaced by noise of the image's seed or by zeros, handed to the inpainting
pipeline instead of the input image). Imports torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdfleet import inpaint
from sdfleet.runtimes import _diffusers_pipes as P
from sdfleet.runtimes import _inpaint_images as I
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.unsupported import images_made

LATENT_FILLS = (2, 3)


@dataclass
class Inpainting:
    """A masked job's inputs made ready for the pipeline, one per image, and its infotext words."""

    spec: inpaint.Inpaint
    canvases: list[I.Canvas]
    said: list[tuple[str, Any]]


def prepare(job: Job) -> Inpainting | None:
    """The job's inputs made ready for inpainting under its mask; None without a mask. Image work
    only (a large mask blurred far takes seconds): the runtime does it before it waits for the
    device, so that another job's images are made meanwhile."""
    p = job.params
    spec = inpaint.read(job.type, p)
    if spec is None:
        return None
    assert job.mask is not None, "the runtime's _check refuses a masked job without its mask"
    size, mode = (p.width, p.height), P.resize_mode(p)
    mask = I.shape_mask(job.mask, spec, size, mode)
    inputs = [P.decode_image(data) for data in job.init_images]
    images = range(images_made(job.type, p, len(inputs)))  # item i starts from input i
    canvases = [I.canvas(inputs[i % len(inputs)], mask, spec.fill, size, mode) for i in images]
    return Inpainting(spec, canvases, inpaint.words(spec, cropped=mask.region is not None))


def from_latents(ready: Inpainting | None) -> bool:
    """Whether the job's call starts from latents (``latent_start``): a latent fill with something
    masked (a blank mask is plain image-to-image, from the input's pixels)."""
    return ready is not None and ready.spec.fill in LATENT_FILLS and ready.canvases[0].overlay is not None


def call_args(
    pipe: Any, readied: Sequence[Inpainting], seeds: Sequence[int], size: tuple[int, int]
) -> dict[str, Any]:
    """The inpainting pipeline's arguments for masked jobs, each its own inputs and masks;
    ``seeds``: each image's."""
    canvases = [each for mine in readied for each in mine.canvases]
    kwargs: dict[str, Any] = {
        "image": [each.image for each in canvases],
        "mask_image": [each.mask for each in canvases],
        "width": size[0],
        "height": size[1],
    }
    spec = readied[0].spec  # its fill kind and rounding are the call's (batch_key)
    round_masks(pipe, spec.round)
    if from_latents(readied[0]):  # so is every job's of the call (``_diffusers_generate._calls``)
        kwargs |= latent_start(pipe, canvases, spec.fill, seeds, size)
    return kwargs


def whole_masked(pipe: Any, size: tuple[int, int], seeds: Sequence[int], latents: bool) -> dict[str, Any]:
    """An inpainting UNet's image-to-image arguments beside its input (one image a seed) as SD
    WebUI gives its hires fix's second pass: the whole image masked, the masked input all grey.
    Given latents (a ``Latent`` upscaler's), the pipeline would take zeros for the grey input's
    latents: they are made here, the grey encoded as SD WebUI encodes it."""
    args = _whole(size, len(seeds))
    if latents:
        grey = torch.zeros(len(seeds), 3, size[1], size[0], device=pipe.device, dtype=pipe.vae.dtype)
        args["masked_image_latents"] = pipe._encode_vae_image(grey, generator=_generators(seeds))
    return args


def unmasked(kwargs: dict[str, Any], img2img: bool, size: tuple[int, int]) -> None:
    """An inpainting UNet's task without a mask, as SD WebUI runs it: the whole image masked, the
    masked input all grey; text-to-image from an input of grey at full strength (pure noise)."""
    images = len(kwargs["generator"])
    kwargs |= _whole(size, images)
    if not img2img:
        kwargs["image"] = [Image.new("RGB", size, (128, 128, 128))] * images
        kwargs["strength"] = 1.0


def latent_start(
    pipe: Any, canvases: Sequence[I.Canvas], fill: int, seeds: Sequence[int], size: tuple[int, int]
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
    if P.inpainting_unet(pipe):  # an inpainting UNet reads the masked input's pixels
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


def _whole(size: tuple[int, int], images: int) -> dict[str, Any]:
    """The pipeline's mask and size for ``images`` images masked whole (the masked input: grey)."""
    return {"mask_image": [Image.new("L", size, 255)] * images, "width": size[0], "height": size[1]}


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
