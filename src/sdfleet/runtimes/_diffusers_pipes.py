"""Helpers of the diffusers runtime: samplers, devices, pipeline loading, images. Imports torch."""

from __future__ import annotations

import io
import json
import logging
import math
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import diffusers as _diffusers_module
import torch
from PIL import Image

from sdfleet import hires, variation
from sdfleet.errors import ModelLoadError, Reject
from sdfleet.models.catalog import ModelInfo
from sdfleet.runtimes._diffusers_samplers import SAMPLERS
from sdfleet.runtimes._prompt_syntax import emphasis_of, emphasis_said
from sdfleet.runtimes.unsupported import batches
from sdfleet.tasks import TaskParams, TaskType
from sdfleet.telemetry import adopt_library_logs

log = logging.getLogger(__name__)
# Typed as Any: many diffusers entry points are untyped, which mypy --strict refuses to call.
diffusers: Any = _diffusers_module

CONDITIONAL_MASK_WEIGHT = 1.0
"""SD WebUI's ``inpainting_mask_weight`` option's default: how much of the input an inpainting
UNet is shown outside the mask (1: none of it inside). Another value is refused (an override)."""
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


def make_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler for sampler ``name`` built from the model's own scheduler config."""
    cls_name, overrides = SAMPLERS[name]
    cls = getattr(diffusers, cls_name)
    config = dict(base_config)
    config.pop("use_karras_sigmas", None)
    config.pop("algorithm_type", None)
    if cls_name == "DDIMScheduler" and not config.get("steps_offset"):
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
    pipe.set_progress_bar_config(disable=True)
    _clip_skip_compat(pipe)
    return pipe


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
    """An image-to-image pipeline sharing ``pipe``'s components (no reload, no extra memory)."""
    img = diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
    img.set_progress_bar_config(disable=True)
    return img


def inpaint_from(pipe: Any) -> Any:
    """An inpainting pipeline sharing ``pipe``'s components: for a model with a plain UNet it keeps
    the unmasked latents on the input's own noised path at each step; an inpainting UNet (9 input
    channels) is given the mask and the masked image as well."""
    inpaint = diffusers.AutoPipelineForInpainting.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)
    return inpaint


def inpainting_unet(pipe: Any) -> bool:
    """Whether ``pipe``'s UNet is an inpainting one (SD 1.5/2/XL "inpainting" checkpoints): 9 input
    channels, the latents, the mask and the masked input's latents."""
    return bool(pipe.unet.config.in_channels == 9)


def img2img_steps(steps: int, strength: float) -> int:
    """Enough steps that ``int(steps * strength)`` denoising steps is at least one."""
    if strength <= 0:
        raise Reject("denoising_strength must be above 0 for image-to-image", code="invalid_params")
    return max(steps, math.ceil(1 / strength))


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


def infotext(
    params: TaskParams,
    seed: int,
    sampler: str,
    model: str,
    hires_said: tuple[tuple[str, Any], ...] = (),
    variation_said: Sequence[tuple[str, Any]] = (),
    kind: TaskType = TaskType.TEXT_TO_IMAGE,
    loras_said: str | None = None,
    inpaint_said: Sequence[tuple[str, Any]] = (),
    conditional: bool = False,
) -> str:
    """The A1111 ``parameters`` text for one image, in SD WebUI 1.10's order (``hires_said``,
    ``variation_said``: a hires fix's and variation seeds' words; ``loras_said``: its ``Lora
    hashes``; ``inpaint_said``: inpainting's words; ``conditional``: made by an inpainting UNet,
    SD WebUI's ``Conditional mask weight``). What SD WebUI's PNG Info reads back to make the image
    again: image-to-image's denoising strength and clip skip included."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    said: list[tuple[str, Any]] = [
        ("Steps", params.steps),
        ("Sampler", sampler),
        ("CFG scale", params.cfg_scale),
        ("Seed", seed),
        ("Size", f"{params.width}x{params.height}"),
        ("Model", model),
        *variation_said,
    ]
    if kind is TaskType.IMAGE_TO_IMAGE:
        said.append(("Denoising strength", params.denoising_strength))
    said += hires_said[:1]  # its denoising strength, in the same slot
    if conditional:  # SD WebUI's inpainting_mask_weight option, at its default (others refused)
        said.append(("Conditional mask weight", CONDITIONAL_MASK_WEIGHT))
    if params.clip_skip > 1:
        said.append(("Clip skip", params.clip_skip))
    if params.extra.get("tiling") is True:
        said.append(("Tiling", "True"))
    said += hires_said[1:]
    said += inpaint_said
    if loras_said is not None:  # quoted, as SD WebUI quotes a value with a colon or a comma
        said.append(("Lora hashes", json.dumps(loras_said, ensure_ascii=False)))
    mode = emphasis_of(params.extra)
    if emphasis_said(mode, (params.prompt, params.negative_prompt)):
        said.append(("Emphasis", mode))
    lines.append(", ".join(f"{k}: {v}" for k, v in said))
    return "\n".join(lines)


def build_info(
    params: TaskParams,
    seeds: list[int],
    sampler: str,
    model: ModelInfo,
    steps: int,
    kind: TaskType = TaskType.TEXT_TO_IMAGE,
    subseeds: Sequence[int] = (),
    loras_said: str | None = None,
    inpaint_said: Sequence[tuple[str, Any]] = (),
    conditional: bool = False,
) -> dict[str, Any]:
    """An A1111-like ``info`` dict for a txt2img/img2img result (``subseeds``: each image's
    variation seed, with variation seeds; ``loras_said``: ``Lora hashes``; ``inpaint_said``:
    inpainting's infotext words; ``conditional``: made by an inpainting UNet)."""
    second = hires.plan(kind, params)
    said = second.generation_params if second else ()
    varied = variation.read(params)
    subs: Sequence[int | None] = subseeds or [None] * len(seeds)
    words = partial(infotext, loras_said=loras_said, inpaint_said=inpaint_said, conditional=conditional)
    texts = [
        words(params, s, sampler, model.stem, said, variation.words(varied, sub), kind)
        for s, sub in zip(seeds, subs, strict=True)
    ]
    info: dict[str, Any] = {
        "prompt": params.prompt,
        "all_prompts": [params.prompt] * len(seeds),
        "negative_prompt": params.negative_prompt,
        "all_negative_prompts": [params.negative_prompt] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else -1,
        "all_subseeds": list(subseeds) or [-1] * len(seeds),
        "subseed_strength": varied.strength if varied else 0,
        "seed_resize_from_w": varied.resize_from[0] if varied and varied.resize_from else -1,
        "seed_resize_from_h": varied.resize_from[1] if varied and varied.resize_from else -1,
        "steps": steps,
        "sampler_name": sampler,
        "cfg_scale": params.cfg_scale,
        "width": params.width,
        "height": params.height,
        "batch_size": len(seeds) // batches(params),  # SD WebUI's: one batch of the n_iter
        "denoising_strength": params.denoising_strength,
        "clip_skip": params.clip_skip,
        "sd_model_checkpoint": model.name,
        "sd_model_name": model.stem,
        "infotexts": texts,
        "runtime": "diffusers",
    }
    # for `runtime serve`, which writes its own infotexts: what only the run knew
    if inpaint_said:
        info["inpainting"] = dict(inpaint_said)
    if loras_said is not None:
        info["lora_hashes"] = loras_said
    if conditional:
        info["conditional_mask_weight"] = CONDITIONAL_MASK_WEIGHT
    note = model.tiny_note()
    if note is not None:
        info["note"] = note
    return info


def sampler_name_of(scheduler: Any) -> str:
    """Best A1111 name for a scheduler instance (for info when the job named no sampler)."""
    cls_name = type(scheduler).__name__
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    for name, (cls, overrides) in SAMPLERS.items():
        if cls == cls_name and bool(overrides.get("use_karras_sigmas", False)) == karras:
            return name
    return cls_name
