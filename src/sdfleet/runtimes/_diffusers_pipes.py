"""Helpers of the diffusers runtime: samplers, devices, pipeline loading, images. Imports torch."""

from __future__ import annotations

import io
import logging
import threading
from typing import Any, Literal

import diffusers as _diffusers_module
import numpy as np
import torch
from PIL import Image

from sdfleet.errors import ModelLoadError, Reject
from sdfleet.models.catalog import ModelInfo
from sdfleet.runtimes._diffusers_dpm2 import DPM2AncestralDiscarding, DPM2Discarding
from sdfleet.runtimes._diffusers_lms import LMSFromItsStart
from sdfleet.runtimes._diffusers_samplers import SAMPLERS, k_diffusion
from sdfleet.runtimes._diffusers_sde import DPMSolverSDEAsSDWebUI, DPMSolverSDEWithSeeds
from sdfleet.runtimes._diffusers_timesteps import DDIMAsSDWebUI, PLMSAsSDWebUI
from sdfleet.runtimes._diffusers_unipc import UniPCAsSDWebUI
from sdfleet.tasks import TaskParams
from sdfleet.telemetry import adopt_library_logs

log = logging.getLogger(__name__)
# Typed as Any: many diffusers entry points are untyped, which mypy --strict refuses to call.
diffusers: Any = _diffusers_module

# diffusers/accelerate loading is not thread-safe (concurrent loads in one process fail with
# "Cannot copy out of meta tensor"); `sdfleet up` runs one runtime per queue in one process.
_LOAD_LOCK = threading.Lock()
_quiet = False


def quiet_libraries() -> None:
    """No progress bars or advisory warnings from diffusers/transformers in an agent's logs; their
    errors as the agent's own log lines (JSON), not plain text from their own handlers."""
    global _quiet
    if _quiet:
        return
    import transformers as _transformers

    transformers: Any = _transformers
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for library in ("diffusers", "transformers"):  # their own plain-text handlers, not propagated
        adopt_library_logs(library)
    _quiet = True


_SD_WEBUIS: dict[str, Any] = {
    "DPM2": DPM2Discarding,
    "DPM2 a": DPM2AncestralDiscarding,
    "LMS": LMSFromItsStart,
    "DDIM": DDIMAsSDWebUI,
    "PLMS": PLMSAsSDWebUI,
    "UniPC": UniPCAsSDWebUI,
    "DPM++ 2M SDE": DPMSolverSDEAsSDWebUI,
    "DPM++ SDE": DPMSolverSDEWithSeeds,
}
"""The samplers (with or without Karras) whose diffusers scheduler steps otherwise than SD WebUI's
of that name, and theirs (``_diffusers_dpm2``: DPM2's and DPM2 a's dropped next-to-last sigma;
``_diffusers_lms``: LMS's order counted from a call's first step; ``_diffusers_timesteps``: DDIM's
and PLMS's timesteps; ``_diffusers_unipc``: UniPC's times, its image-to-image schedule;
``_diffusers_sde``: DPM++ 2M SDE's and DPM++ SDE's Brownian-tree noise, one tree an image;
PNDM, which SD WebUI lacks, stays diffusers')."""


def make_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler for sampler ``name`` built from the model's own scheduler config, on SD
    WebUI's schedule: a k-diffusion sampler's timesteps from 999 to 0 in equal steps (a model's
    config, SD 1.5's and SDXL's, says ``leading`` from 1: 951 to 1 of 20 steps, a first sigma of
    10.2 where SD WebUI's is 14.6, and Karras sigmas between those), DDIM's and PLMS's from 1 every
    ``1000 // n``, UniPC's time-uniform as SD WebUI's own; DPM2's and DPM2 a's without the
    next-to-last sigma, LMS's order from a call's first step (``_SD_WEBUIS``); a timestep
    sampler's call that starts mid-schedule (image-to-image, a hires pass) on SD WebUI's own
    schedule for it."""
    cls_name, overrides = SAMPLERS[name]
    cls = _SD_WEBUIS.get(name.removesuffix(" Karras")) or getattr(diffusers, cls_name)
    config = dict(base_config)
    config.pop("use_karras_sigmas", None)
    config.pop("algorithm_type", None)
    if k_diffusion(name):
        config["timestep_spacing"], config["steps_offset"] = "linspace", 0
    elif cls_name == "DDIMScheduler" and not config.get("steps_offset"):
        config["steps_offset"] = 1
    return cls.from_config(config, **overrides)


def scheduler_for(sampler: str | None, base: Any) -> Any:
    """A fresh scheduler for ``sampler`` (a ``SAMPLERS`` key), else the model's own kind."""
    return make_scheduler(sampler, base.config) if sampler else type(base).from_config(base.config)


def load_pipeline(info: ModelInfo, device: str, dtype: torch.dtype) -> Any:
    """Load a txt2img pipeline from a diffusers folder or a single-file checkpoint, local files only."""
    quiet_libraries()
    try:
        with _LOAD_LOCK:
            pipe = _load(info, device, dtype)
    except Exception as e:
        raise ModelLoadError(f"cannot load model {info.name!r} from {info.path}: {e}") from e
    _clip_skip_compat(pipe)
    return as_the_runtime_runs_it(pipe)


def as_the_runtime_runs_it(pipe: Any) -> Any:
    """``pipe`` without its progress bar, making its images' 8-bit pixels as SD WebUI does,
    truncated (``(255 × x).astype(uint8)``) where diffusers rounds: otherwise half its pixels lie
    one above SD WebUI's (a mean of 0.5 apart from images that are the same before it)."""
    pipe.set_progress_bar_config(disable=True)
    pipe.image_processor.numpy_to_pil = _to_pil_truncated
    return pipe


def _to_pil_truncated(images: np.ndarray) -> list[Image.Image]:
    """diffusers' ``VaeImageProcessor.numpy_to_pil`` (floats in 0..1, batch last-channel),
    truncating."""
    if images.ndim == 3:
        images = images[None, ...]
    pixels = (images * 255).astype("uint8")
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p.squeeze(), mode="L") for p in pixels]
    return [Image.fromarray(p) for p in pixels]


def _clip_skip_compat(pipe: Any) -> None:
    """diffusers' clip_skip path reads ``text_encoder.text_model.final_layer_norm``; transformers 5
    flattened ``CLIPTextModel`` (no ``text_model``). An unregistered alias keeps clip skip working
    without adding a submodule (which would duplicate the weights in state dicts)."""
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        flat = encoder is not None and not hasattr(encoder, "text_model")
        if flat and hasattr(encoder, "final_layer_norm"):
            object.__setattr__(encoder, "text_model", encoder)


def _load(info: ModelInfo, device: str, dtype: torch.dtype) -> Any:
    if info.kind == "diffusers":
        pipe = diffusers.AutoPipelineForText2Image.from_pretrained(
            str(info.path), dtype=dtype, local_files_only=True, safety_checker=None
        )
    else:
        pipe = _load_single_file(info, dtype)
    return pipe.to(device)


def _load_single_file(info: ModelInfo, dtype: torch.dtype) -> Any:
    if info.config is None:  # the family and its config from the weights (_diffusers_detect)
        from sdfleet.runtimes._diffusers_detect import load_detected

        return load_detected(info, dtype)
    cls: Any = diffusers.StableDiffusionPipeline
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "config": str(info.config)}
    index = cls.load_config(str(info.config))
    cls = getattr(diffusers, str(index.get("_class_name", "StableDiffusionPipeline")))
    return cls.from_single_file(str(info.path), **kwargs)


def set_tiling(pipe: Any, on: bool, *, vae_tiling: bool = False) -> None:
    """SD WebUI's ``tiling``: every convolution of the UNet and the VAE pads circularly (the image
    wraps around at its edges, so it tiles seamlessly); off, they pad with zeros as loaded. The
    image-to-image pipeline shares these modules. The VAE decodes in one piece while on (a tile of
    a tiled decode would wrap around itself), else as ``vae_tiling`` says."""
    pipe.vae.use_tiling = vae_tiling and not on
    mode: Literal["circular", "zeros"] = "circular" if on else "zeros"
    for part in (pipe.unet, pipe.vae):
        for layer in part.modules():
            if isinstance(layer, torch.nn.Conv2d) and layer.padding_mode != mode:
                layer.padding_mode = mode


def img2img_from(pipe: Any) -> Any:
    """An image-to-image pipeline sharing ``pipe``'s components (no reload, no extra memory); for
    an inpainting UNet an inpainting one, given the whole image masked (``inpainting_unet``)."""
    if inpainting_unet(pipe):
        return inpaint_from(pipe)
    return as_the_runtime_runs_it(diffusers.AutoPipelineForImage2Image.from_pipe(pipe))


def inpaint_from(pipe: Any) -> Any:
    """An inpainting pipeline sharing ``pipe``'s components: for a model with a plain UNet it keeps
    the unmasked latents on the input's own noised path at each step; an inpainting UNet (9 input
    channels) is given the mask and the masked image as well."""
    return as_the_runtime_runs_it(diffusers.AutoPipelineForInpainting.from_pipe(pipe))


def inpainting_unet(pipe: Any) -> bool:
    """Whether ``pipe``'s UNet is an inpainting one (SD 1.5/2/XL "inpainting" checkpoints): 9 input
    channels, the latents, the mask and the masked input's latents."""
    return bool(pipe.unet.config.in_channels == 9)


def decode_image(data: bytes, size: tuple[int, int] | None = None, resize_mode: int = 0) -> Image.Image:
    """An input image as RGB, brought to ``size`` by SD WebUI's ``resize_mode`` (``fit``)."""
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:
        raise Reject(f"init image is not a readable image: {e}", code="invalid_image") from e
    image = image.convert("RGB")
    if size is not None and image.size != size:
        image = fit(image, size, resize_mode)
    return image


def fit(image: Image.Image, size: tuple[int, int], resize_mode: int = 0) -> Image.Image:
    """SD WebUI's image-to-image resize modes: 0 stretches to ``size``; 1 keeps the aspect ratio and
    covers ``size``, centred, the excess cropped; 2 keeps it and fits inside, centred, the bands
    left filled by stretching the image's edge rows (or columns) across them. Lanczos throughout."""
    width, height = size
    if resize_mode == 0:
        return image.resize(size, Image.Resampling.LANCZOS)
    ratio, own = width / height, image.width / image.height
    if (ratio > own) if resize_mode == 1 else (ratio < own):  # the widths match
        scaled = (width, max(1, image.height * width // image.width))
    else:  # (a side that would be 0 pixels is 1: SD WebUI fails there)
        scaled = (max(1, image.width * height // image.height), height)
    resized = image.resize(scaled, Image.Resampling.LANCZOS)
    out = Image.new("RGB", size)
    left, top = width // 2 - scaled[0] // 2, height // 2 - scaled[1] // 2
    out.paste(resized, (left, top))
    if resize_mode == 2 and top > 0:  # bands above and below
        edge = Image.Resampling.BICUBIC  # PIL's default for resize with a box, as SD WebUI calls it
        out.paste(resized.resize((width, top), edge, box=(0, 0, width, 0)), (0, 0))
        bottom = resized.resize((width, top), edge, box=(0, scaled[1], width, scaled[1]))
        out.paste(bottom, (0, top + scaled[1]))
    elif resize_mode == 2 and left > 0:  # bands left and right
        edge = Image.Resampling.BICUBIC
        out.paste(resized.resize((left, height), edge, box=(0, 0, 0, height)), (0, 0))
        right = resized.resize((left, height), edge, box=(scaled[0], 0, scaled[0], height))
        out.paste(right, (left + scaled[0], 0))
    return out


def resize_mode(p: TaskParams) -> int:
    """SD WebUI's image-to-image ``resize_mode`` (0, 1 or 2; another is refused before)."""
    value = p.extra.get("resize_mode")
    return value if isinstance(value, int) and value in (1, 2) else 0
