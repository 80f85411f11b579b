"""What the diffusers runtime says of the images it made: SD WebUI 1.10's ``info`` and infotexts.

Each image's infotext is ``sdfleet.infotext``'s, the one ``runtime serve`` writes for the same
request: ``Sampler`` and ``Schedule type`` as SD WebUI 1.10 says them, ``Model hash``, the words
of variation seeds, a hires fix, inpainting, LoRAs, emphasis and DDIM's eta where SD WebUI puts
them, and ``Version``. No torch here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdfleet import hires, refiner, variation
from sdfleet import infotext as words
from sdfleet.models import checkpoint_hash
from sdfleet.models.catalog import ModelInfo
from sdfleet.runtimes._diffusers_samplers import SAMPLERS, etas_said, hires_said, sampler_key
from sdfleet.runtimes._diffusers_samplers import said as sampler_said
from sdfleet.runtimes.unsupported import batches
from sdfleet.tasks import TaskParams, TaskType

log = logging.getLogger(__name__)

CONDITIONAL_MASK_WEIGHT = 1.0
"""SD WebUI's ``inpainting_mask_weight`` option's default: how much of the input an inpainting
UNet is shown outside the mask (1: none of it inside). Another value is refused (an override)."""


@dataclass(frozen=True)
class Call:
    """What one pipeline call was, the same for every job it made images for."""

    sampler: str
    """The sampler run (a ``SAMPLERS`` key, or the model's own scheduler's name)."""
    model: ModelInfo
    steps: int
    model_hash: str | None = None
    """``Model hash``: the first ``checkpoint_hash.SHORT`` hex digits (``model_hash``)."""
    loras: str | None = None
    """``Lora hashes`` of the LoRAs it applied."""
    conditional: bool = False
    """Made by an inpainting UNet: SD WebUI's ``Conditional mask weight``."""
    hires_checkpoint: str | None = None
    """``Hires checkpoint``: the short title (``short_title``) of ``hr_checkpoint_name``'s model."""
    refiner: tuple[str, float | None] | None = None
    """``Refiner`` and ``Refiner switch at``: the refiner's short title and its switch, where it
    took over."""
    refined: tuple[bool, bool] = (False, False)
    """The passes the refiner took over: the first, a hires fix's second."""
    skipped: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    """The words of the skips of each pass's negative rows (``sdfleet.ngms``: NGMS, Skip Early CFG)
    in the order first said: the first pass's, a hires fix's second's."""


def short_title(info: ModelInfo, model_hash: str | None) -> str:
    """SD WebUI's ``short_title`` of a checkpoint: its stem, and its short hash once known."""
    return f"{info.stem} [{model_hash}]" if model_hash else info.stem


def model_hash(info: ModelInfo) -> str | None:
    """The checkpoint's ``Model hash`` (blocking: reads a file not hashed before, once; a
    multi-GB one takes seconds); None where it cannot be read, which no image is failed for."""
    try:
        return checkpoint_hash.sha256(info)[: checkpoint_hash.SHORT]
    except OSError as e:  # gone (evicted by another process) or unreadable since it was loaded
        log.warning("no Model hash for %s: %s", info.name, e)
        return None


def infotext(
    params: TaskParams,
    kind: TaskType,
    seed: int,
    call: Call,
    variation_said: Sequence[tuple[str, Any]],
    extra: Mapping[str, Any],
) -> str:
    """The A1111 ``parameters`` text of one image (``variation_said``: the words of its variation
    seeds; ``extra``: the task's ``generation_params``). What SD WebUI's PNG Info reads back to
    make the image again."""
    name, schedule = sampler_said(call.sampler, params.extra.get("scheduler"))
    core: dict[str, Any] = {
        "Steps": params.steps,
        "Sampler": name,
        "Schedule type": schedule,
        "CFG scale": params.cfg_scale,
        "Seed": seed,
        "Size": f"{params.width}x{params.height}",
        "Model hash": call.model_hash,
        "Model": call.model.stem,
        **dict(variation_said),
        "Denoising strength": params.denoising_strength if kind is TaskType.IMAGE_TO_IMAGE else None,
        # SD WebUI's inpainting_mask_weight option, at its default (others are refused)
        "Conditional mask weight": CONDITIONAL_MASK_WEIGHT if call.conditional else None,
        "Clip skip": params.clip_skip if params.clip_skip > 1 else None,
        "Tiling": "True" if params.extra.get("tiling") is True else None,
    }
    return words.text(params.prompt, params.negative_prompt, core, extra)


def generation_params(
    params: TaskParams,
    kind: TaskType,
    call: Call,
    inpaint_said: Sequence[tuple[str, Any]] = (),
    conditioning: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """SD WebUI's ``extra_generation_params`` of the task, the same for each of its images, in
    their order (``inpaint_said``, ``conditioning``: the words of inpainting and of its prompts'
    encoding, ``_diffusers_prompts.conditioning_said``)."""
    second = hires.plan(kind, params)
    extra: dict[str, Any] = dict(second.generation_params if second else ())  # its strength in place
    if second is not None:
        extra[hires.SCHEDULE_WORD] = hires_schedule(params, call, second)
    if second is not None and second.checkpoint:
        extra[hires.CHECKPOINT_WORD] = call.hires_checkpoint
    extra |= dict(inpaint_said)
    if call.loras is not None:
        extra["Lora hashes"] = call.loras
    extra |= conditioning or {}
    multiplier = variation.noise_multiplier(kind, params)  # checked before the run
    if multiplier != 1:
        extra["Noise multiplier"] = multiplier
    eta = params.extra.get("eta")
    eta = eta if isinstance(eta, int | float) else None
    etas = etas_said(call.sampler, eta, second, params)
    chosen = refiner.options(params.extra)  # checked before the run
    return extra | refiner.said_while_sampling(
        chosen, etas, call.refiner, call.refined, second is not None, call.skipped
    )


def hires_schedule(params: TaskParams, call: Call, second: hires.Hires) -> str | None:
    """``Hires schedule type``: the second pass's schedule where SD WebUI says it."""
    sampler, scheduler = hires.sampler_of(second, params)
    key = sampler_key(sampler, scheduler) or call.sampler  # checked before the run
    return hires_said(call.sampler, params.extra.get("scheduler"), key, scheduler)


def build_info(
    params: TaskParams,
    kind: TaskType,
    seeds: list[int],
    call: Call,
    subseeds: Sequence[int] = (),
    inpaint_said: Sequence[tuple[str, Any]] = (),
    conditioning: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """An A1111-like ``info`` dict for a txt2img/img2img result (``subseeds``: each image's
    variation seed, with variation seeds; ``inpaint_said``, ``conditioning``: inpainting's and
    the prompts' encoding's infotext words)."""
    varied = variation.read(params)
    subs: Sequence[int | None] = subseeds or [None] * len(seeds)
    extra = generation_params(params, kind, call, inpaint_said, conditioning)
    texts = [
        infotext(params, kind, s, call, variation.words(varied, sub), extra)
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
        "steps": call.steps,
        "sampler_name": sampler_said(call.sampler, params.extra.get("scheduler"))[0],
        "cfg_scale": params.cfg_scale,
        "width": params.width,
        "height": params.height,
        "batch_size": len(seeds) // batches(params),  # SD WebUI's: one batch of the n_iter
        "denoising_strength": params.denoising_strength,
        "clip_skip": params.clip_skip,
        "sd_model_checkpoint": call.model.name,
        "sd_model_name": call.model.stem,
        "sd_model_hash": call.model_hash,
        "infotexts": texts,
        "version": words.VERSION,
        "runtime": "diffusers",
    }
    # for `runtime serve`, which writes its own infotexts: what only the run knew
    if inpaint_said:
        info["inpainting"] = dict(inpaint_said)
    if call.loras is not None:
        info["lora_hashes"] = call.loras
    if call.conditional:
        info["conditional_mask_weight"] = CONDITIONAL_MASK_WEIGHT
    if hires.SCHEDULE_WORD in extra:  # its place is kept for every hires fix
        info["hires_schedule_type"] = extra[hires.SCHEDULE_WORD]
    if call.hires_checkpoint is not None:
        info["hires_checkpoint"] = call.hires_checkpoint
    if call.refiner is not None:
        info["refiner"] = list(call.refiner)
        info["refiner_passes"] = list(call.refined)
    if any(call.skipped):
        info["negative_skips"] = [dict(words) for words in call.skipped]
    info["conditioning"] = dict(conditioning or {})  # TI hashes and Emphasis, in their order
    note = call.model.tiny_note()
    if note is not None:
        info["note"] = note
    return info


def sampler_name_of(scheduler: Any) -> str:
    """Best A1111 name for a scheduler instance (for info when the job named no sampler)."""
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    for kind in type(scheduler).__mro__:  # sdfleet's own are diffusers' of another schedule
        for name, (cls, overrides) in SAMPLERS.items():
            if cls == kind.__name__ and bool(overrides.get("use_karras_sigmas", False)) == karras:
                return name
    return type(scheduler).__name__
