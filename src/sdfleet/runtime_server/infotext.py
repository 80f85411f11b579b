"""What SD WebUI says about a generation: the ``info`` JSON of an answer and each image's infotext.

Field for field as SD WebUI 1.10's ``Processed.js()`` and ``create_infotext`` write them, for the
features this server has (no face restoration or VAE choice, which requests cannot turn
on here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdfleet import hires, refiner
from sdfleet import infotext as words
from sdfleet.infotext import VERSION
from sdfleet.runtime_server.options import Options
from sdfleet.runtime_server.samplers import Resolved
from sdfleet.runtime_server.schemas import GenerationBody, Img2ImgRequest


@dataclass
class Generation:
    """One txt2img/img2img request as run: what its info and infotexts are made of."""

    request: GenerationBody
    sampler: Resolved
    seeds: list[int]
    subseeds: list[int]
    model_name: str | None
    model_hash: str | None
    clip_skip: int
    job_timestamp: str
    options: Options
    extra: dict[str, Any] = field(default_factory=dict)
    """``extra_generation_params``: the schedule used, img2img's denoising strength."""
    batch_size: int | None = None
    """The batch as run, where it is not the request's (img2img: as many items as input images)."""
    tiling: bool = False
    """Made to tile seamlessly (the request's ``tiling``, else the ``tiling`` option)."""
    conditional_mask_weight: float | None = None
    """Made by an inpainting checkpoint: SD WebUI's ``inpainting_mask_weight`` (the run says)."""
    styled: tuple[str, str] | None = None
    """The prompt and negative prompt with the request's ``styles`` merged in (None: none asked):
    what the images were made from, and what SD WebUI's info and infotexts say."""
    etas: tuple[dict[str, float], dict[str, float]] = ({}, {})
    """The first pass's and the hires pass's samplers' eta words (``etas_said``), which the run
    says again in its order with the refiner's (``refiner.said_while_sampling``)."""
    refining: refiner.Options = field(default_factory=refiner.Options)
    """The refiner's options the request ran with."""
    noise_multiplier: float = 1.0
    """An img2img request's ``initial_noise_multiplier`` as run (its field, override or option)."""

    def __post_init__(self) -> None:
        if self.sampler.schedule_param is not None:
            self.extra["Schedule type"] = self.sampler.schedule_param
        if isinstance(self.request, Img2ImgRequest):
            self.extra["Denoising strength"] = self.request.denoising_strength

    @property
    def prompt(self) -> str:
        return self.styled[0] if self.styled else self.request.prompt or ""

    @property
    def negative_prompt(self) -> str:
        return self.styled[1] if self.styled else self.request.negative_prompt or ""


def infotext(gen: Generation, index: int) -> str:
    """The ``parameters`` text of image ``index``."""
    r, opts = gen.request, gen.options
    strength = r.subseed_strength or 0
    resized = (r.seed_resize_from_w or 0) > 0 and (r.seed_resize_from_h or 0) > 0
    core: dict[str, Any] = {
        "Steps": r.steps,
        "Sampler": gen.sampler.sampler,
        "Schedule type": gen.sampler.schedule_label,
        "CFG scale": r.cfg_scale,
        "Seed": gen.seeds[index],
        "Size": f"{r.width}x{r.height}",
        "Model hash": gen.model_hash if opts["add_model_hash_to_info"] else None,
        "Model": gen.model_name if opts["add_model_name_to_info"] else None,
        "Variation seed": gen.subseeds[index] if strength != 0 else None,
        "Variation seed strength": strength if strength != 0 else None,
        "Seed resize from": f"{r.seed_resize_from_w}x{r.seed_resize_from_h}" if resized else None,
        "Conditional mask weight": gen.conditional_mask_weight,
        "Clip skip": gen.clip_skip if gen.clip_skip > 1 else None,
        "Tiling": "True" if gen.tiling else None,
    }
    version = VERSION if opts["add_version_to_infotext"] else None
    return words.text(gen.prompt, gen.negative_prompt, core, gen.extra, version)


def info(gen: Generation, infotexts: list[str], *, index_of_first_image: int = 0) -> dict[str, Any]:
    """``Processed.js()``: the ``info`` of a txt2img/img2img answer, before JSON encoding
    (``index_of_first_image`` 1 where a grid comes first, its infotext first in ``infotexts``)."""
    r, n = gen.request, len(gen.seeds)
    return {
        "prompt": gen.prompt,
        "all_prompts": [gen.prompt] * n,
        "negative_prompt": gen.negative_prompt,
        "all_negative_prompts": [gen.negative_prompt] * n,
        "seed": gen.seeds[0],
        "all_seeds": gen.seeds,
        "subseed": gen.subseeds[0],
        "all_subseeds": gen.subseeds,
        "subseed_strength": r.subseed_strength,
        "width": r.width,
        "height": r.height,
        "sampler_name": gen.sampler.sampler,
        "cfg_scale": r.cfg_scale,
        "steps": r.steps,
        "batch_size": gen.batch_size or r.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": gen.model_name,
        "sd_model_hash": gen.model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": r.seed_resize_from_w,
        "seed_resize_from_h": r.seed_resize_from_h,
        "denoising_strength": r.denoising_strength,
        # SD WebUI's hires prompt words are functions of the image there, which its JSON writes null
        "extra_generation_params": {k: None if k in hires.PROMPT_WORDS else v for k, v in gen.extra.items()},
        "index_of_first_image": index_of_first_image,
        "infotexts": infotexts,
        "styles": list(r.styles or []),
        "job_timestamp": gen.job_timestamp,
        "clip_skip": gen.clip_skip,
        "is_using_inpainting_conditioning": gen.conditional_mask_weight is not None,
        "version": VERSION,
    }
