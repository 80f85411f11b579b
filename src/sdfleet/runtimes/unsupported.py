"""What the built-in runtimes cannot run: task types (``RUNS``), SD WebUI request fields the
diffusers runtime does not implement, samplers and schedule types it does not have, and more
img2img inputs than the batch (``img2img_batch``, SD WebUI's rule). The API asks at the door for
the queue a task is routed to (``refuse``: a 422, not a failed task later); each runtime asks again
for tasks no API saw (the seed's Lambda publishes to the bus itself).

The seed hands every field to SD WebUI, which honours them; a task asking for one the diffusers
runtime lacks fails with ``unsupported_option`` naming them rather than running without it (an
a1111 queue runs such tasks as SD WebUI does). Fields that do not change the images
(``send_images``, ``save_images``...) are not listed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sdfleet import hires, inpaint, ngms, refiner, variation
from sdfleet.errors import Reject
from sdfleet.runtimes._diffusers_lora import parse, text
from sdfleet.runtimes._diffusers_samplers import sampler_key
from sdfleet.runtimes._prompt_schedule import Unread, composable, of_task, refuse_deep
from sdfleet.runtimes._prompt_syntax import emphasis_of, weighted
from sdfleet.runtimes._styles import names as style_names
from sdfleet.tasks import BATCH_MAX, GENERATE, N_ITER_MAX, TaskParams, TaskType

_ALL_BUT_PIPELINE = frozenset(TaskType) - {TaskType.PIPELINE}
RUNS: dict[str, frozenset[TaskType]] = {
    "diffusers": _ALL_BUT_PIPELINE,
    "a1111": _ALL_BUT_PIPELINE,  # SD WebUI's txt2img, img2img, extra-single-image, extra-batch-images
    "comfyui": frozenset({TaskType.PIPELINE}),  # a workflow; the others are SD WebUI's requests
    "synthetic": _ALL_BUT_PIPELINE,
}
"""The task types each built-in runtime runs (a plugin runtime is not listed: it decides)."""
IMAGES_MAX: dict[str, int] = {"diffusers": 16}
"""Most images (``batch_size``) a text- or image-to-image task may ask of a runtime that makes them
itself, in one pipeline call; SD WebUI runs what it is given, up to ``tasks.BATCH_MAX``."""
LACKING = frozenset({"diffusers"})
"""Built-in runtimes that run txt2img/img2img themselves without these fields (a1111 hands every
field to SD WebUI; comfyui runs workflows)."""

READ_AS_SD_WEBUI = frozenset({"diffusers", "a1111"})
"""Built-in runtimes whose text- and image-to-image prompts SD WebUI's prompt reader reads (a1111)
or this package's reading of it (diffusers)."""
PROMPT_MAX = 32_768
"""Most characters in each prompt of a task for those runtimes. Both read a prompt in Python, token
by token, before the GPU starts (SD WebUI under its queue lock): a 1 MiB prompt held the diffusers
runtime 38 s and 2.2 GB with the tiny model, against 0.1 s for a line; real prompts are a few
hundred characters."""

_FLAGS = ("restore_faces",)
"""Booleans that change the images when true (face restoration)."""
_NON_EMPTY = ("latent_mask", "script_name")
"""A second mask for the latents (SD WebUI's API takes none: it answers 500), a script of SD
WebUI's ``scripts`` list."""
_TAKEN: dict[str, tuple[object, ...]] = {
    "infotext": (None, ""),
}
"""Fields the diffusers runtime runs only at these values (SD WebUI's defaults, and what webuiapi
sends by default; another value changes the images in a way it does not implement): parameters
read from an infotext (k-diffusion's churn and noise: ``SAMPLER_FIELDS``). (A given
first pass, ``firstpass_image``, is the hires fix's: ``hires.unsupported``.)"""
_IMG2IMG_TAKEN: dict[str, tuple[object, ...]] = {
    "resize_mode": (None, 0, 1, 2),
}
"""The same for image-to-image: the resize modes it implements (stretch, crop and fill; not 3, a
latent upscale)."""
_OVERRIDES_READ = {
    "sd_model_checkpoint",
    "CLIP_stop_at_last_layers",
    "emphasis",
    refiner.PASS_OPTION,
    refiner.BY_STEPS_OPTION,
    variation.MULTIPLIER,
    ngms.ALL_OPTION,
    ngms.EARLY_OPTION,
}
_NO_OP_VAE = ("", "Automatic", "None")
"""``sd_vae`` values that ask for the checkpoint's own VAE: what the runtime uses."""


def runnable(runtimes: Iterable[str]) -> frozenset[TaskType]:
    """The task types some of ``runtimes`` runs (all, with a runtime not listed in ``RUNS``)."""
    kinds: frozenset[TaskType] = frozenset()
    for name in runtimes:
        kinds |= RUNS.get(name, frozenset(TaskType))
    return kinds


_SAMPLERS: dict[str, Callable[[str | None, str | None], object]] = {"diffusers": sampler_key}
"""Runtimes whose samplers are known without asking a server (SD WebUI's depend on its version)."""


def refuse_kind(runtime: str, kind: TaskType) -> None:
    """``Reject`` (``unsupported_task``) when ``runtime`` cannot run ``kind`` tasks, naming those
    that can."""
    if kind in RUNS.get(runtime, frozenset(TaskType)):
        return
    able = [name for name, kinds in RUNS.items() if kind in kinds and name != "synthetic"]
    raise Reject(
        f"the {runtime} runtime cannot run {kind.value!r} tasks: send them to a queue with the "
        f"{' or '.join(able)} runtime",
        code="unsupported_task",
    )


def images_max(runtime: str) -> int:
    """Most images a task may ask of ``runtime`` (``IMAGES_MAX``, else ``tasks.BATCH_MAX``)."""
    return IMAGES_MAX.get(runtime, BATCH_MAX)


def batches(params: TaskParams) -> int:
    """``n_iter``, SD WebUI's batch count (1 when absent or null). ``Reject`` (``invalid_params``)
    unless it is an integer from 1 to ``N_ITER_MAX`` (a message published past the API may hold
    anything)."""
    n_iter = params.extra.get("n_iter", 1)
    if n_iter is None:
        return 1
    if type(n_iter) is not int or not 1 <= n_iter <= N_ITER_MAX:
        raise Reject(f"n_iter must be an integer from 1 to {N_ITER_MAX}", code="invalid_params")
    return n_iter


def images_made(kind: TaskType, params: TaskParams, inputs: int) -> int:
    """How many images a text- or image-to-image task makes: ``n_iter`` batches of ``batch_size``
    (of ``img2img_batch`` with several inputs), with consecutive seeds, as SD WebUI makes them."""
    batch = params.batch_size
    if kind is TaskType.IMAGE_TO_IMAGE and inputs > 1:
        batch = img2img_batch(inputs, batch)
    return batch * batches(params)


def refuse_too_many_images(runtime: str, kind: TaskType, params: TaskParams) -> None:
    """``Reject`` (``too_large``) for more images than ``runtime`` makes in one call."""
    bound = images_max(runtime)
    if kind not in GENERATE:
        return
    # a runtime that makes the images itself makes the n_iter batches in that one call
    n_iter = batches(params) if runtime in IMAGES_MAX else 1
    images = params.batch_size * n_iter
    asked = "batch_size" if n_iter == 1 else f"batch_size {params.batch_size} × n_iter {n_iter}"
    if images > bound:
        raise Reject(
            f"the {runtime} runtime makes at most {bound} images a task, not {images} "
            f"({asked}): ask for fewer, or send the task to a queue with the a1111 runtime",
            code="too_large",
        )


def refuse(runtime: str, kind: TaskType, params: TaskParams) -> None:
    """Every check here for a ``kind`` task with ``params`` on a queue of ``runtime``: ``Reject``
    with the code the runtime would fail the task with (``unsupported_task``, ``too_large``,
    ``unsupported_option``, ``unknown_sampler``, ``unknown_scheduler``, ``invalid_params``)."""
    refuse_kind(runtime, kind)
    refuse_too_many_images(runtime, kind, params)
    refuse_oversized_prompts(runtime, kind, params)
    found = unsupported_for(runtime, kind, params)
    if found:
        raise Reject(unsupported_message(found, runtime), code="unsupported_option")
    samplers = _SAMPLERS.get(runtime)
    if samplers is not None and kind in GENERATE:
        samplers(params.sampler, params.extra.get("scheduler"))
    refuse_bad_weights(runtime, kind, params)
    if runtime in LACKING:
        hires.plan(kind, params)  # its values, as the runtime reads them
        refiner.read(params)
        inpaint.read(kind, params)
        ngms.read(params)
        if kind in GENERATE:
            style_names(params)  # a list of names; whether they exist is the runtime's to say


def refuse_oversized_prompts(runtime: str, kind: TaskType, params: TaskParams) -> None:
    """Where ``runtime`` hands prompts to SD WebUI's prompt reader or reads them as it does:
    ``Reject`` (``too_large``) for a prompt over ``PROMPT_MAX`` characters, and (``invalid_params``)
    for brackets nested too deep for that reader (``_prompt_schedule.refuse_deep``)."""
    if runtime not in READ_AS_SD_WEBUI or kind not in GENERATE:
        return
    for prompt in prompts(params):
        if len(prompt) > PROMPT_MAX:
            raise Reject(
                f"a prompt of {len(prompt):,} characters: at most {PROMPT_MAX:,} (about "
                f"{PROMPT_MAX // 4:,} tokens)",
                code="too_large",
            )
        refuse_deep(prompt)


def refuse_bad_weights(runtime: str, kind: TaskType, params: TaskParams) -> None:
    """``Reject`` (``invalid_params``) for a prompt weight that is not a number, where ``runtime``
    reads the prompts itself (SD WebUI fails such a request with a server error), and for an
    emphasis mode SD WebUI does not have."""
    if runtime in LACKING and kind in GENERATE and emphasis_of(params.extra) != "None":
        weighted(params.prompt)
        weighted(params.negative_prompt)


def prompts(params: TaskParams) -> list[str]:
    """The prompts of a task that SD WebUI reads: the prompt and negative prompt, and the hires
    fix's own where given."""
    extra = [params.extra.get(name) for name in ("hr_prompt", "hr_negative_prompt")]
    return [params.prompt, params.negative_prompt, *(text for text in extra if isinstance(text, str))]


def img2img_batch(inputs: int, batch_size: int) -> int:
    """SD WebUI's img2img batch for ``inputs`` input images: each item starts from its own input,
    so a batch of more than one input is as large as the inputs (one input: ``batch_size`` items
    from it). ``Reject`` for more inputs than ``batch_size`` (``refuse_too_many_inputs``)."""
    refuse_too_many_inputs(inputs, batch_size)
    return inputs if inputs > 1 else batch_size


def refuse_too_many_inputs(inputs: int, batch_size: int) -> None:
    """``Reject`` (``invalid_params``) for more img2img inputs than batch items, in SD WebUI's words."""
    if inputs > batch_size:
        raise Reject(
            f"bad number of images passed: {inputs}; expecting {batch_size} or less "
            "(image-to-image starts batch item i from input image i: raise batch_size)",
            code="invalid_params",
        )


def unsupported(params: TaskParams, kind: TaskType = TaskType.TEXT_TO_IMAGE) -> list[str]:
    """The fields of ``params.extra`` that would change a ``kind`` task's images and that the
    diffusers runtime does not implement, as ``name`` or ``name=value``."""
    extra: dict[str, Any] = params.extra
    found = [k for k in _FLAGS if extra.get(k) is True]
    found += off_defaults(extra, kind, params.sampler)
    found += prompts_unsupported(params, kind)
    if extra.get("enable_hr") is True:  # SD WebUI's hires fix is text-to-image's
        found += hires.unsupported(params) if kind is TaskType.TEXT_TO_IMAGE else ["enable_hr"]
    found += [k for k in _NON_EMPTY if extra.get(k)]
    if kind is TaskType.TEXT_TO_IMAGE and extra.get("mask"):
        found.append("mask (inpainting is image-to-image's)")
    found += variation_unsupported(params, kind)
    scripts = extra.get("alwayson_scripts")
    if isinstance(scripts, dict):
        found += [f"alwayson_scripts.{name}" for name in scripts]
    overrides = extra.get("override_settings")
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            if key in _OVERRIDES_READ or (key == "sd_vae" and value in _NO_OP_VAE):
                continue
            found.append(f"override_settings.{key}")
    return found


def prompts_unsupported(params: TaskParams, kind: TaskType) -> list[str]:
    """What SD WebUI reads in a task's prompts and the diffusers runtime does not: composable
    diffusion (``AND``) beside a refiner or without CFG, editing it cannot read as SD WebUI's
    grammar would."""
    prompt = text(params.prompt)
    found = _composed_unsupported(params) if composable(prompt) else []
    found += _skips_unsupported(params, prompt)
    try:
        of_task(prompt, text(params.negative_prompt), params.steps)
    except Unread as e:
        return [*found, e.reason]
    return found + _second_pass_prompts(params, kind)


def _composed_unsupported(params: TaskParams, field: str = "the prompt") -> list[str]:
    """Where a prompt of several parts (``AND``: SD WebUI's composable diffusion) does not run:
    beside a refiner, and without CFG (diffusers then makes no prediction of the negative
    prompt)."""
    found = []
    if params.extra.get("refiner_checkpoint") not in refiner.NONE:
        found.append(f"AND in {field} (SD WebUI's composable diffusion) with refiner_checkpoint")
    if params.cfg_scale <= 1:
        found.append(f"AND in {field} (SD WebUI's composable diffusion) with cfg_scale 1 or less")
    return found


def _skips_unsupported(params: TaskParams, prompt: str) -> list[str]:
    """Where the skips of the negative prompt (NGMS's ``s_min_uncond``, ``skip_early_cond``) do not
    run: beside a refiner (whose UNet takes over the call's) and with composable diffusion (whose
    parts stand in for the UNet already). Named as sent."""
    overrides = params.extra.get("override_settings")
    asked = [
        (name, value)
        for name, value in (
            (ngms.FIELD, params.extra.get(ngms.FIELD)),
            (ngms.EARLY_OPTION, overrides.get(ngms.EARLY_OPTION) if isinstance(overrides, dict) else None),
        )
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    ]  # none asked for, or no number: invalid_params (ngms.read)
    if not asked:
        return []  # every task comes here: the prompts are read for AND only for a skip
    found = []
    own = hires.prompts(params) if params.extra.get("enable_hr") is True else None
    composed = composable(prompt) or (own is not None and composable(text(own[0])))
    for name, value in asked:
        if params.extra.get("refiner_checkpoint") not in refiner.NONE:
            found.append(f"{name}={value!r} with refiner_checkpoint")
        if composed:
            found.append(f"{name}={value!r} with AND in a prompt (SD WebUI's composable diffusion)")
    return found


def _second_pass_prompts(params: TaskParams, kind: TaskType) -> list[str]:
    """What the diffusers runtime does not do with a hires fix's own prompts (``hires.prompts``):
    composable diffusion where the prompt's does not run, editing it cannot read, and other LoRAs
    than the first pass's (SD WebUI switches its networks between the passes)."""
    own = hires.prompts(params) if hires.asked(kind, params) else None
    if own is None:
        return []
    prompt, negative = text(own[0]), text(own[1])
    found = _composed_unsupported(params, "hr_prompt") if composable(prompt) else []
    try:
        of_task(prompt, negative, params.steps)
    except Unread as e:
        found.append(f"hr_prompt or hr_negative_prompt: {e.reason}")
    if params.extra.get("disable_extra_networks") is not True:
        if _loras(*own) != _loras(params.prompt, params.negative_prompt):
            found.append("hr_prompt or hr_negative_prompt with other LoRAs than the first pass's")
    return found


def _loras(prompt: str, negative: str) -> list[tuple[str, float, float]]:
    return sorted(
        (u.name.lower(), u.te, u.unet) for u in parse(prompt, lenient=True) + parse(negative, lenient=True)
    )


def off_defaults(fields: Mapping[str, Any], kind: TaskType, sampler: str | None) -> list[str]:
    """``name=value`` of SD WebUI request ``fields`` set to what changes the images and the
    diffusers runtime does not implement (``_TAKEN``; ``SAMPLER_FIELDS`` for the samplers that
    take them where it does not run them; DDIM's ``eta`` it takes)."""
    checked = {**_TAKEN, **(_IMG2IMG_TAKEN if kind is TaskType.IMAGE_TO_IMAGE else {})}
    found = [f"{k}={fields[k]!r}" for k, same in checked.items() if k in fields and fields[k] not in same]
    second = fields.get("hr_sampler_name") if fields.get("enable_hr") is True else None
    for name in dict.fromkeys(canonical(each) for each in (sampler, second)):  # a hires pass's too
        for field, (default, takers, runs) in SAMPLER_FIELDS.items():
            value = fields.get(field)
            if value not in (None, default) and name in takers and name not in runs:
                found.append(f"{field}={value!r} (with {name})")
    return found


SAMPLER_FIELDS: dict[str, tuple[float, frozenset[str], frozenset[str]]] = {
    "eta": (1, frozenset({"Euler a", "DPM2 a", "DPM++ SDE", "DPM++ 2M SDE"}), frozenset({"Euler a"})),
    "s_churn": (0, frozenset({"Euler", "Heun", "DPM2"}), frozenset({"Euler"})),
    "s_noise": (1, frozenset({"DPM2 a", "DPM++ SDE", "DPM++ 2M SDE"}), frozenset()),
}
"""k-diffusion's fields by SD WebUI's name: their default, this runtime's samplers whose SD WebUI
1.10 counterparts take them, and those whose the diffusers runtime runs (``_diffusers_ancestral``,
``_diffusers_churn``; Euler's, Heun's and DPM2's ``s_noise`` scales only their churn: Euler's
runs, the others' is refused). The other samplers ignore them, as SD WebUI's do (its Euler a
takes no ``s_noise``)."""
ETA_RUN = SAMPLER_FIELDS["eta"][2]


def canonical(sampler: object) -> str | None:
    """This runtime's name of SD WebUI sampler ``sampler``, its schedule type aside; None for none
    it knows (refused elsewhere)."""
    try:
        key = sampler_key(sampler) if isinstance(sampler, str) else None
    except Reject:
        return None
    return key.removesuffix(" Karras") if key else None


def eta_taker(sampler: object) -> str | None:
    """The sampler ``sampler`` is where its SD WebUI counterpart takes ``eta``, or None."""
    name = canonical(sampler)
    return name if name in SAMPLER_FIELDS["eta"][1] else None


def variation_unsupported(params: TaskParams, kind: TaskType) -> list[str]:
    """Variation seeds and the noise multiplier where the diffusers runtime starts an image from
    noise alone, not from its input noised: a masked image-to-image task at ``denoising_strength``
    1 (SD WebUI noises the input there too; an inpainting checkpoint's unmasked one is refused
    when it runs, ``_diffusers_noise.NoiseNotTaken``). ``Reject`` (``invalid_params``) for values
    that are no seed, size or number (``variation.read``, ``variation.noise_multiplier``)."""
    varied = variation.read(params)
    multiplier = variation.noise_multiplier(kind, params)
    if params.denoising_strength < 1 or not inpaint.asked(kind, params):  # asked: image-to-image's
        return []
    names = ["subseed_strength (variation seeds)"] if varied and varied.strength != 0 else []
    names += ["seed_resize_from_w/h (variation seeds)"] if varied and varied.resize_from else []
    names += [f"{variation.MULTIPLIER}={multiplier!r}"] if multiplier != 1 else []
    return [f"{name} with a mask at denoising_strength 1" for name in names]


def ancestral(sampler: str | None) -> bool:
    """Whether SD WebUI sampler ``sampler`` adds noise at each step (``Euler a``, ``DPM2 a``...)."""
    return sampler is not None and "a" in sampler.lower().split()


def unsupported_for(runtime: str, kind: TaskType, params: TaskParams) -> list[str]:
    """``unsupported(params)`` where ``runtime`` runs ``kind`` without those fields, else nothing."""
    return unsupported(params, kind) if runtime in LACKING and kind in GENERATE else []


def unsupported_message(found: list[str], runtime: str) -> str:
    return (
        f"the {runtime} runtime does not implement {', '.join(found)}: leave them out, or send "
        "the task to a queue with the a1111 runtime (SD WebUI implements them)"
    )
