"""A pipeline call's prompts read anew (Imports torch): a hires fix's second pass's (its own
prompts, or another model's text encoders reading the first pass's), and a refiner's when it
takes a call over (``_diffusers_refiner``). Each for one job: such jobs run alone (``batch_key``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdfleet import hires, refiner
from sdfleet.runtimes import _diffusers_edits as D
from sdfleet.runtimes import _diffusers_lora as L
from sdfleet.runtimes import _diffusers_prompts as E
from sdfleet.runtimes import _diffusers_refiner as RF
from sdfleet.runtimes import _prompt_schedule as PS
from sdfleet.runtimes._diffusers_samplers import sampler_key, total_steps
from sdfleet.runtimes.base import Job
from sdfleet.tasks import TaskParams


def prompts(job: Job) -> tuple[PS.Edits, float]:
    """The job's prompt and negative prompt at each step (a pass through the UNet), as the text
    encoder sees them (without extra-network tags and the prompt's own weight), and that weight
    (``_prompt_schedule.of_params``). ``Reject`` (``unsupported_option``) for editing it cannot
    read."""
    return PS.of_params(job.params)


def own_second_pass(job: Job, plan: hires.Hires) -> tuple[PS.Edits, float] | None:
    """``second_prompts`` where they are not what the first call started with; None where the
    first call's serve."""
    edits, weight = second_prompts(job, plan)
    started, started_weight = prompts(job)
    if not edits.changes and edits.at(0) == started.at(0) and weight == started_weight:
        return None
    return edits, weight


def second_texts(p: TaskParams, plan: hires.Hires) -> tuple[str, str, int, int]:
    """A hires fix's second pass's prompt and negative prompt (its own, ``hires.prompts``, or the
    first pass's; LoRA tags out), the passes it makes and the first pass's, as SD WebUI counts them
    to schedule prompt edits."""
    prompt, negative = hires.prompts(p) or (p.prompt, p.negative_prompt)
    first = total_steps(sampler_key(p.sampler, p.extra.get("scheduler")), p.steps)
    steps = total_steps(sampler_key(*hires.sampler_of(plan, p)), plan.steps)
    return L.text(prompt), L.text(negative), steps, first


def second_prompts(job: Job, plan: hires.Hires) -> tuple[PS.Edits, float]:
    """``prompts`` of a hires fix's second pass (``second_texts``), scheduled over its steps as SD
    WebUI schedules them (``_prompt_schedule.schedule``)."""
    return PS.of_task(*second_texts(job.params, plan))


def clip_skip(p: TaskParams) -> int | None:
    """diffusers' clip skip: A1111 counts the last layer as 1, diffusers as 0 (None: the last)."""
    return p.clip_skip - 1 if p.clip_skip > 1 else None


@dataclass
class Refine:
    """A refiner (``sdfleet.refiner``) and its model's pipeline."""

    models: Any
    plan: refiner.Refiner


def take_over(
    pipe: Any,
    steps: int,
    call: dict[str, Any],
    refine: Refine,
    job: Job,
    images: int,
    edits: tuple[PS.Edits, float],
    reading: E.Reading,
    raw: Any,
) -> RF.Swap | None:
    """Readies a pipeline call's arguments (``call``, changed in place; ``raw``: its progress
    callback) for the refiner that takes over where its switch is reached (called for the pass
    it refines: a hires fix's second, else the only one); the ``Swap`` to give back after the
    call, or None where it does not take over (its switch is not reached, or it is the call's
    own model)."""
    if refine.models.unet is pipe.unet:
        return None
    plan = refine.plan
    at = RF.switch_step(pipe.scheduler, steps, call.get("strength"), plan.switch_at, plan.options.by_steps)
    if at is None:
        return None
    swap = RF.Swap(at, refine.models, guided=float(call.get("guidance_scale", 0.0)) > 1)
    schedule, weight = edits
    p = job.params
    if at == 0:  # from the first pass through the UNet: the refiner's embeddings from the start
        swap.take_over(pipe)
        for name in [*call]:
            if name in PROMPT_ARGS:
                del call[name]
        # as embeddings: given as text, the call's own pipeline would read it with its encoders
        call |= prompt_args(refine.models, schedule.at(0), images, p, weight, reading, as_text=False)
    call["callback_on_step_end"] = D.switching(raw, schedule, images, clip_skip(p), reading, swap)
    call["callback_on_step_end_tensor_inputs"] = D.tensor_inputs(pipe)
    return swap


PROMPT_ARGS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
        "guidance_scale",
        "callback_on_step_end_tensor_inputs",
    }
)


def second_pass(
    pipe: Any,
    job: Job,
    images: int,
    plan: hires.Hires,
    reading: E.Reading,
    callback: Any,
    *,
    fresh: bool = False,
) -> tuple[dict[str, Any], Any] | None:
    """A hires fix's second pass's prompt arguments and step callback, read by ``pipe``'s text
    encoders as the first pass reads them, where its prompts are not the first call's
    (``own_second_pass``) or ``fresh`` (another model reads them); None where the first call's
    serve."""
    p = job.params
    own = second_prompts(job, plan) if fresh else own_second_pass(job, plan)
    if own is None:
        return None
    edits, weight = own
    args = prompt_args(pipe, edits.at(0), images, p, weight, reading)
    composed = PS.composable(edits.at(0)[0])  # its parts are read by their own UNet (_diffusers_composed)
    if edits.changes and not composed:  # its callback swaps the embeddings where the schedule says
        args["callback_on_step_end_tensor_inputs"] = D.tensor_inputs(pipe)
        callback = D.switching(callback, edits, images, clip_skip(p), reading)
    return args, callback


def without_prompts(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without its prompt arguments (``PROMPT_ARGS``)."""
    return {k: v for k, v in kwargs.items() if k not in PROMPT_ARGS}


def prompt_args(
    pipe: Any,
    texts: tuple[str, str],
    images: int,
    p: TaskParams,
    weight: float,
    reading: E.Reading,
    *,
    as_text: bool = True,
) -> dict[str, Any]:
    """A call's prompt arguments for one job's ``texts`` (``images`` of each), read by ``pipe``'s
    text encoders as the first pass reads them (``as_text``: as text where the pipeline reads it
    as SD WebUI does); its CFG scale by the prompt's own ``weight``."""
    prompt, negative = texts
    args: dict[str, Any] = {"guidance_scale": p.cfg_scale * weight}
    if as_text and E.chunk_count(pipe, prompt, negative, reading)[1]:
        args |= {"prompt": [prompt] * images, "negative_prompt": [negative] * images if negative else None}
    else:
        embeds = E.encode(pipe, prompt, negative or None, clip_skip(p), reading)
        args |= E.call_embeds(pipe, [embeds], [images])
    return args
