"""Pipeline calls for one job or for a batch of compatible jobs (dynamic batching). Imports torch.

Each job keeps its own prompt, negative prompt and seeds (one ``torch.Generator`` per image, the
same as when it runs alone), and gets back its own images and info. Jobs may share a batch when
their ``batch_key`` is equal: same model, task type, size, steps, sampler, CFG scale, strength,
clip skip, tiling, eta, hires fix and variation strength — what one pipeline call takes once for
all images. The batch is one call, or one per length of its prompts' embeddings
(``_diffusers_prompts``), each followed by its hires pass (``_diffusers_hires``). A call with
variation seeds is given its starting noise (``_diffusers_noise``); a job whose prompts change
during sampling (prompt editing) runs alone, its step callback swapping the embeddings
(``_diffusers_edits``). Jobs with a mask (inpainting) share a call with jobs masked alike (the
same fill kind and mask rounding), each with its own input, mask and region: their inputs made
ready beforehand (``_diffusers_inpaint.prepare``, ``_inpaint_images``), their masked latents
filled (``_diffusers_inpaint``: a call's jobs all start from latents or all from pixels,
``_calls``), their images pasted back into their inputs. An inpainting UNet's job without a mask
is given the whole image masked (``_diffusers_inpaint.unmasked``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from sdfleet import hires, inpaint, ngms, refiner, variation
from sdfleet.errors import Reject
from sdfleet.media import to_png
from sdfleet.models.catalog import ModelInfo
from sdfleet.runtimes import _diffusers_blend as B
from sdfleet.runtimes import _diffusers_churn as K
from sdfleet.runtimes import _diffusers_composed as C
from sdfleet.runtimes import _diffusers_edits as D
from sdfleet.runtimes import _diffusers_hires as H
from sdfleet.runtimes import _diffusers_info as R
from sdfleet.runtimes import _diffusers_inpaint as F
from sdfleet.runtimes import _diffusers_lora as L
from sdfleet.runtimes import _diffusers_ngms as G
from sdfleet.runtimes import _diffusers_noise as N
from sdfleet.runtimes import _diffusers_passes as Q
from sdfleet.runtimes import _diffusers_pipes as P
from sdfleet.runtimes import _diffusers_prompts as E
from sdfleet.runtimes import _inpaint_images as I
from sdfleet.runtimes import _prompt_syntax as S
from sdfleet.runtimes import _textual_inversion as T
from sdfleet.runtimes import unsupported as U
from sdfleet.runtimes._diffusers_samplers import img2img_schedule, sampler_key
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.tasks import TaskParams, TaskType


def batch_key(job: Job, sampler: str | None) -> tuple[object, ...] | None:
    """Jobs with equal keys may run in one pipeline call; None: this job runs alone."""
    if job.type not in (TaskType.TEXT_TO_IMAGE, TaskType.IMAGE_TO_IMAGE):
        return None
    p = job.params
    try:
        second = hires.plan(job.type, p)
        refiner.read(p)
        varied = variation.read(p)
        multiplier = variation.noise_multiplier(job.type, p)
        edits, weight = Q.prompts(job)
        masked = inpaint.read(job.type, p)
        skip = ngms.read(p)
    except Reject:
        return None  # it fails alone, with its own reason
    if edits.changes or refiner.read(p) or C.asked(p):
        return None  # its callback swaps the embeddings (a refiner's UNet, the parts' UNet) of the call
    if second is not None and (second.checkpoint or Q.own_second_pass(job, second) is not None):
        return None  # its second pass's prompts are its own, edited anew or another model's to read
    img2img = job.type is TaskType.IMAGE_TO_IMAGE
    loras = L.key(job)  # tasks with other LoRAs (or weights) never share a call
    if loras is None:
        return None
    return (
        job.model,
        job.type,
        p.width,
        p.height,
        p.steps,
        sampler,
        p.cfg_scale * weight,
        p.denoising_strength if img2img else None,
        multiplier,
        p.clip_skip,
        # an empty negative prompt is None to the pipeline (SDXL then uses zero embeddings, not
        # the empty string's): the call passes None only when every job of it has none
        bool(L.text(p.negative_prompt)),
        tiling(p),
        eta(p),
        K.read(p),
        repr(skip),  # its words are the call's: Skip Early CFG's 1 and 1.0 are said apart
        second,
        varied.key if varied else None,
        loras,
        # its own input, mask and region are image work; a call takes one pipeline (an unmasked
        # job's differs), one mask rounding and, for the latent fills, one of them
        masked and (masked.fill if masked.fill in F.LATENT_FILLS else "pixels", masked.round),
    )


def eta(p: TaskParams) -> float | None:
    """SD WebUI's ``eta``, for the samplers that take it: DDIM's step, Euler a's scheduler
    (``_diffusers_ancestral``); the others' other than 1 is refused (``unsupported.off_defaults``),
    and the rest ignore it, as there."""
    value = p.extra.get("eta")
    runs = not U.ancestral(p.sampler) or U.eta_taker(p.sampler) in U.ETA_RUN
    return float(value) if isinstance(value, int | float) and runs else None


def tiling(p: TaskParams) -> bool:
    """SD WebUI's ``tiling``: an image that tiles seamlessly (``_diffusers_pipes.set_tiling``)."""
    return p.extra.get("tiling") is True


@dataclass
class _Part:
    """One job's share of a call: its images are ``[start, start + len(seeds))``."""

    job: Job
    seed: int
    seeds: list[int]
    start: int
    variation: variation.Variation | None = None
    subseeds: list[int] = field(default_factory=list)
    """Each image's variation seed, with a ``variation``."""
    inpainting: F.Inpainting | None = None
    """A masked job's inputs made ready, what puts its images back, and its infotext words."""
    conditioning: dict[str, str] = field(default_factory=dict)
    """What its prompts' encoding says in the infotext (``_diffusers_prompts.conditioning_said``)."""


def _parts(jobs: Sequence[Job]) -> list[_Part]:
    parts, start = [], 0
    for job in jobs:
        p = job.params
        seed = p.seed if p.seed >= 0 else random.randrange(2**32)
        images = U.images_made(job.type, p, len(job.init_images))
        varied = variation.read(p)
        seeds = variation.seeds(seed, images, varied)
        subseeds = variation.subseeds(varied, images) if varied else []
        parts.append(_Part(job, seed, seeds, start, varied, subseeds))
        start += len(seeds)
    return parts


def call_kwargs(
    pipe: Any,
    jobs: Sequence[Job],
    callback: Any,
    readings: Sequence[E.Reading],
    ready: Sequence[F.Inpainting | None],
) -> tuple[dict[str, Any], list[_Part], int]:
    """The pipeline's arguments for ``jobs`` (compatible by ``batch_key``), their parts, and steps;
    ``readings``: how each job's prompts are read (``_reading``); ``ready``: each job's
    ``_diffusers_inpaint.prepare``, made before the device was waited for."""
    parts = _parts(jobs)
    first = jobs[0].params
    img2img = jobs[0].type is TaskType.IMAGE_TO_IMAGE
    # what the text encoder sees at the first step: no <lora:...> tags, no weight of the prompt's own
    read = [Q.prompts(part.job) for part in parts]
    texts = [each.at(0) for each, _ in read]
    for part, (schedules, _), reading in zip(parts, read, readings, strict=True):
        part.conditioning = E.conditioning_said(pipe, schedules, reading)
    edits, weight = read[0]  # the call's weight and CFG are the first job's (batch_key)
    each = [(text, len(part.seeds)) for part, text in zip(parts, texts, strict=True)]
    kwargs: dict[str, Any] = {
        "prompt": [prompt for (prompt, _), images in each for _ in range(images)],
        "negative_prompt": [negative for (_, negative), images in each for _ in range(images)]
        if texts[0][1]
        else None,
        "guidance_scale": first.cfg_scale * weight,  # SD WebUI's weight of the prompt scales its CFG
        "num_images_per_prompt": 1,
        "generator": [torch.Generator("cpu").manual_seed(s) for part in parts for s in part.seeds],
        "callback_on_step_end": callback,
        "output_type": "pil",
    }
    if edits.changes and not C.asked(first):  # alone in its call (batch_key); parts: C.composing
        images = len(parts[0].seeds)
        kwargs["callback_on_step_end"] = D.switching(callback, edits, images, Q.clip_skip(first), readings[0])
        kwargs["callback_on_step_end_tensor_inputs"] = D.tensor_inputs(pipe)
    if eta(first) is not None:
        kwargs["eta"] = eta(first)  # used where the scheduler's step takes it (DDIM), else ignored
    if Q.clip_skip(first) is not None:
        kwargs["clip_skip"] = Q.clip_skip(first)
    steps = first.steps
    if img2img:
        steps, kwargs["strength"] = _img2img_schedule(pipe, first, masked=ready[0] is not None)
        size = (first.width, first.height)
        for part, mine in zip(parts, ready, strict=True):
            part.inpainting = mine
        if ready[0] is None:  # every job of the call is masked or none is (batch_key)
            kwargs["image"] = [image for part in parts for image in _init_images(part, size)]
        else:
            readied = [part.inpainting for part in parts if part.inpainting is not None]
            seeds = [seed for part in parts for seed in part.seeds]
            kwargs |= F.call_args(pipe, readied, seeds, size)
    else:
        kwargs.update(width=first.width, height=first.height)
        varied = parts[0].variation  # the same for every part (batch_key)
        if varied is not None:
            kwargs["latents"], kwargs["generator"] = _noise(pipe, varied, parts, first.width, first.height)
    if P.inpainting_unet(pipe) and "mask_image" not in kwargs:
        F.round_masks(pipe, True)
        F.unmasked(kwargs, img2img, (first.width, first.height))
    return kwargs, parts, steps


def _noise(
    pipe: Any, varied: variation.Variation, parts: Sequence[_Part], width: int, height: int
) -> tuple[torch.Tensor, list[Any]]:
    """The starting noise of a text-to-image call with variation seeds, in the pipeline's dtype,
    and the generators for the rest of its steps."""
    scale = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, height // scale, width // scale)
    latents, generators = [], []
    for part in parts:
        noise, gens = N.first_noise(varied, part.seeds, part.subseeds, shape, scale)
        latents.append(noise)
        generators += gens
    return torch.cat(latents).to(pipe.unet.dtype), generators


def _img2img_schedule(pipe: Any, p: TaskParams, masked: bool) -> tuple[int, float]:
    """An image-to-image call's steps and strength: SD WebUI's schedule (``img2img_schedule``),
    but where that starts at the schedule's first step below a strength of 1 in an inpainting
    pipeline (masked, or an inpainting UNet's), which would start from noise alone there, not from
    the input noised as SD WebUI does: diffusers' own (one step fewer, from the next)."""
    ds = p.denoising_strength
    steps, strength = img2img_schedule(sampler_key(p.sampler, p.extra.get("scheduler")), p.steps, ds)
    if strength >= 1 > ds and (masked or P.inpainting_unet(pipe)):
        return img2img_schedule(None, p.steps, ds)
    return steps, strength


def _start_noise(
    pipe: Any, parts: Sequence[_Part], size: tuple[int, int], multiplier: float = 1.0
) -> torch.Tensor | None:
    """The starting noise of an image-to-image call of ``pipe`` at ``size`` (width, height) where it
    is not the pipeline's own: variation seeds (the same for every part, batch_key), a noise
    multiplier. A hires fix's second pass draws it anew as its first pass's, at the pass's size."""
    scale = pipe.vae_scale_factor
    shape = (pipe.vae.config.latent_channels, size[1] // scale, size[0] // scale)
    seeds = [s for part in parts for s in part.seeds]
    subseeds = [s for part in parts for s in part.subseeds]
    return N.img2img_noise(parts[0].variation, seeds, subseeds, shape, scale, multiplier)


def _first_pass_noise(pipe: Any, job: Job, parts: Sequence[_Part]) -> torch.Tensor | None:
    """``_start_noise`` of an image-to-image call; None for text-to-image (its variation noise is
    its latents: ``call_kwargs``)."""
    if job.type is not TaskType.IMAGE_TO_IMAGE:
        return None
    p = job.params
    return _start_noise(pipe, parts, (p.width, p.height), variation.noise_multiplier(job.type, p))


def _init_images(part: _Part, size: tuple[int, int]) -> list[Any]:
    """A part's image-to-image inputs, one per image made: SD WebUI's rule, item i of a batch
    starts from input i (one input: every item), resized by the task's ``resize_mode``."""
    inputs, mode = part.job.init_images, P.resize_mode(part.job.params)
    return [P.decode_image(inputs[i % len(inputs)], size, mode) for i in range(len(part.seeds))]


def inpaintings(jobs: Sequence[Job]) -> list[F.Inpainting | None]:
    """Each job's inputs made ready for inpainting (``_diffusers_inpaint.prepare``), in order."""
    return [F.prepare(job) for job in jobs]


def _put_back(made: list[Any], parts: Sequence[_Part]) -> list[Any]:
    """A call's images, an inpainted one pasted back into its input (``_inpaint_images.composite``)."""
    out: list[Any] = []
    for part in parts:
        mine = made[len(out) : len(out) + len(part.seeds)]
        if part.inpainting is not None:
            canvases = part.inpainting.canvases
            mine = [I.composite(image, each) for image, each in zip(mine, canvases, strict=True)]
        out += mine
    return out


@dataclass
class Generated:
    """A call's images, before PNG encoding (which needs no GPU: done outside the device's lock)."""

    images: list[Any]
    parts: list[_Part]
    sampler: str
    model: ModelInfo
    steps: int
    loras: Sequence[tuple[L.LoraUse, Path]] = ()
    """The LoRAs the call applied (one set for all its jobs: ``batch_key``), for the infotexts."""
    conditional: bool = False
    """Made by an inpainting UNet (SD WebUI's ``Conditional mask weight``)."""
    hires_checkpoint: str | None = None
    """The hires pass's model's ``short_title``, where ``hr_checkpoint_name`` names one."""
    refined: tuple[bool, bool] = (False, False)
    """A refiner took over a call (``_diffusers_passes.Refine``): the first pass's, a hires fix's
    second pass's."""
    skipped: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    """The infotext's words of the skips of a pass's negative rows (``sdfleet.ngms``) in the order
    first said: the first pass's, a hires fix's second's."""
    refiner: str | None = None
    """The refiner's ``short_title``, where it took over."""
    switch_at: float | None = None
    """The refiner's ``refiner_switch_at``."""
    model_hash: str | None = None
    """The checkpoint's ``Model hash`` (``_diffusers_info.model_hash``), read beside the run."""


def generate(
    pipe: Any,
    jobs: Sequence[Job],
    sampler: str | None,
    info: ModelInfo,
    callback: Callable[[int, int], Any],
    second: H.SecondPass | None = None,
    embeddings: T.Embeddings | None = None,
    ready: Sequence[F.Inpainting | None] | None = None,
    refine: Q.Refine | None = None,
) -> Generated:
    """Run ``jobs`` on ``pipe`` (its scheduler already set): one call, or one per prompt length
    when their prompts' embeddings differ in length (``_calls``), each followed by its hires pass
    when there is a ``second``. ``callback(call, calls)`` makes each call's step callback;
    ``embeddings``: the textual inversion embeddings prompts may name; ``ready``: each job's
    inputs made ready for inpainting (``inpaintings``; made here if not given); ``refine``: the
    refiner that takes over the first pass's call, or the hires pass's (a job alone: batch_key)."""
    images: list[Any] = []
    parts: dict[int, _Part] = {}
    steps = 0
    passes = 2 if second else 1
    refined = [False, False]
    skipped: list[dict[str, Any]] = [{}, {}]  # the words of each pass's skips, as first said
    readings = [_reading(job, embeddings) for job in jobs]  # each job's embedding finders made once
    made = inpaintings(jobs) if ready is None else list(ready)
    with torch.inference_mode():
        calls = _calls(pipe, jobs, readings, made)
        for n, (members, embeds) in enumerate(calls):
            total = passes * len(calls)
            mine = [readings[i] for i in members]
            kwargs, call_parts, steps = call_kwargs(
                pipe,
                [jobs[i] for i in members],
                callback(passes * n, total),
                mine,
                [made[i] for i in members],
            )
            if embeds is not None:
                del kwargs["prompt"], kwargs["negative_prompt"]
                kwargs |= E.call_embeds(pipe, embeds, [len(part.seeds) for part in call_parts])
            for i, part in zip(members, call_parts, strict=True):
                part.start += len(images)
                parts[i] = part
            job, images_of = call_parts[0].job, len(call_parts[0].seeds)  # alone where it matters
            seeds = [s for part in call_parts for s in part.seeds]
            skip = ngms.read(job.params)  # one for the call (batch_key)
            said = [skipped[0].update, skipped[1].update]
            if second is None:
                K.ready(pipe.scheduler, kwargs, steps)
                swap = None
                if refine is not None:  # alone (batch_key)
                    raw = callback(passes * n, total)
                    swap = Q.take_over(
                        pipe, steps, kwargs, refine, job, images_of, Q.prompts(job), mine[0], raw
                    )
                noise = _first_pass_noise(pipe, job, call_parts)
                try:
                    with (
                        N.as_sd_webui(pipe, kwargs, seeds, noise),
                        G.stand_ins(
                            pipe, kwargs, C.first_pass(job.params), images_of, mine[0], skip, said[0]
                        ),
                        B.kept_as_sd_webui(pipe, kwargs, sampler),
                    ):
                        images += _put_back(pipe(num_inference_steps=steps, **kwargs).images, call_parts)
                finally:
                    if swap is not None:
                        refined[0] = True
                        swap.give_back(pipe)
                continue
            handed = {**kwargs, "output_type": H.first_output(second)}
            K.ready(pipe.scheduler, handed, steps)
            swap = None
            if refine is not None and refine.plan.options.refines(second=False):  # alone (batch_key)
                raw = callback(passes * n, total)
                swap = Q.take_over(pipe, steps, handed, refine, job, images_of, Q.prompts(job), mine[0], raw)
            try:  # its images decoded by the refiner's VAE where it took over, as in SD WebUI
                with (
                    N.as_sd_webui(pipe, handed, seeds, None),
                    G.stand_ins(pipe, handed, C.first_pass(job.params), images_of, mine[0], skip, said[0]),
                ):
                    first = pipe(num_inference_steps=steps, **handed).images
            finally:
                if swap is not None:
                    refined[0] = True
                    swap.give_back(pipe)
            progress = callback(passes * n + 1, total)
            # another model reads the prompts anew with its own text encoders (alone: batch_key)
            reader, fresh = (second.pipe, True) if second.other_model else (pipe, False)
            own = Q.second_pass(reader, job, images_of, second.plan, mine[0], progress, fresh=fresh)
            again = kwargs if own is None else Q.without_prompts(kwargs) | own[0]
            take_over = None
            if refine is not None and refine.plan.options.refines(second=True):  # alone (batch_key)
                edits = Q.second_prompts(job, second.plan)
                take_over = partial(
                    Q.take_over,
                    refine=refine,
                    job=job,
                    images=images_of,
                    edits=edits,
                    reading=mine[0],
                    raw=progress,
                )
            read = C.second_pass(job.params, second.plan)
            around = partial(
                G.stand_ins, read=read, images=images_of, reading=mine[0], skip=skip, on_skip=said[1]
            )
            noise = _start_noise(second.pipe, call_parts, second.plan.size)
            made, swapped = H.run(
                second, first, again, seeds, progress if own is None else own[1], take_over, around, noise
            )
            images += made
            refined[1] = refined[1] or swapped
    ordered = [parts[i] for i in range(len(jobs))]
    sampler_name = sampler or R.sampler_name_of(pipe.scheduler)
    made_by = Generated(images, ordered, sampler_name, info, steps, conditional=P.inpainting_unet(pipe))
    made_by.refined = (refined[0], refined[1])
    made_by.skipped = (skipped[0], skipped[1])
    made_by.switch_at = refine.plan.switch_at if refine is not None else None
    return made_by


def _reading(job: Job, embeddings: T.Embeddings | None) -> E.Reading:
    return E.Reading(S.emphasis_of(job.params.extra), embeddings)


def _calls(
    pipe: Any, jobs: Sequence[Job], readings: Sequence[E.Reading], ready: Sequence[F.Inpainting | None]
) -> list[tuple[list[int], list[E.Embeds] | None]]:
    """The jobs (by index) of each pipeline call, and their embeddings, or None where the pipeline
    is given their text. Jobs share a call when their embeddings are as long (made longer, with
    empty chunks, a job's images would not be the ones it makes alone) and, masked, when they all
    start from latents or all from pixels (a blank mask beside a latent fill's)."""
    by_length: dict[tuple[int, bool], list[int]] = {}
    as_text: dict[tuple[int, bool], bool] = {}
    texts = [Q.prompts(job)[0].at(0) for job in jobs]
    for i, (prompt, negative) in enumerate(texts):
        chunks, text_ok = E.chunk_count(pipe, prompt, negative, readings[i])
        key = (chunks, F.from_latents(ready[i]))
        by_length.setdefault(key, []).append(i)
        # diffusers reads a negative prompt given as text without clip skip; SD WebUI with it
        as_text[key] = as_text.get(key, True) and text_ok and Q.clip_skip(jobs[i].params) is None
    calls: list[tuple[list[int], list[E.Embeds] | None]] = []
    for key, members in by_length.items():
        if as_text[key]:
            calls.append((members, None))
            continue
        embeds = []
        for i in members:
            prompt, negative = texts[i]
            embeds.append(E.encode(pipe, prompt, negative or None, Q.clip_skip(jobs[i].params), readings[i]))
        calls.append((members, embeds))
    return calls


def encode(g: Generated) -> list[RuntimeResult]:
    """One result per job, its images as PNGs carrying A1111's ``parameters`` text (blocking: it
    hashes a LoRA file the first time one is named there)."""
    loras = L.hashes_said(g.loras)
    refined = (g.refiner, g.switch_at) if g.refiner else None
    call = R.Call(
        g.sampler,
        g.model,
        g.steps,
        g.model_hash,
        loras,
        g.conditional,
        g.hires_checkpoint,
        refined,
        g.refined,
        g.skipped,
    )
    return [_result(part, g, call) for part in g.parts]


def _result(part: _Part, g: Generated, call: R.Call) -> RuntimeResult:
    p: TaskParams = part.job.params
    said = part.inpainting.said if part.inpainting else ()
    info = R.build_info(p, part.job.type, part.seeds, call, part.subseeds, said, part.conditioning)
    mine = g.images[part.start : part.start + len(part.seeds)]
    pngs = [to_png(img, text) for img, text in zip(mine, info["infotexts"], strict=True)]
    return RuntimeResult(images=pngs, info=info, seed=part.seed, model=g.model.name)
