"""txt2img and img2img: an SD WebUI request → a runtime job → SD WebUI's answer.

The server settles what SD WebUI settles before sampling (sampler and schedule, seeds and subseeds,
the model, clip skip) so that ``info`` is complete even when a job is interrupted. Sizes that are
not a multiple of 8 run at the size rounded down, and are reported as asked, as in SD WebUI.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import random
from typing import Any

from pydantic import ValidationError

from sdfleet import hires, inpaint, ngms, refiner, variation
from sdfleet.errors import Interrupted, Reject
from sdfleet.models.checkpoint_hash import SHORT
from sdfleet.runtime_server import grid, infotext, pnginfo
from sdfleet.runtime_server.errors import failed, invalid_image, refused
from sdfleet.runtime_server.images import api_image
from sdfleet.runtime_server.infotext import Generation
from sdfleet.runtime_server.options import CLIP_SKIP, Options, clip_skip_value
from sdfleet.runtime_server.samplers import resolve
from sdfleet.runtime_server.schemas import GenerationBody, Img2ImgRequest, Txt2ImgRequest
from sdfleet.runtime_server.state import ServerState
from sdfleet.runtimes import _prompt_schedule as PS
from sdfleet.runtimes._diffusers_samplers import etas_said
from sdfleet.runtimes._prompt_syntax import emphasis_said
from sdfleet.runtimes._styles import apply as apply_styles
from sdfleet.runtimes.unsupported import IMAGES_MAX, img2img_batch, off_defaults, variation_unsupported
from sdfleet.tasks import TaskParams, TaskType

_MAX_IMAGES = IMAGES_MAX["diffusers"]
_HIRES = (
    "enable_hr",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
)
"""A txt2img request's hires fix fields, handed to the runtime as they came (``sdfleet.hires``)."""
_VARIATION = ("subseed_strength", "seed_resize_from_w", "seed_resize_from_h")
"""Variation seeds' fields, handed over as they came (``sdfleet.variation``) beside the subseed."""
_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
"""k-diffusion's churn (Euler's: ``runtimes/_diffusers_churn.py``), handed over as it came."""
_REFINER = ("refiner_checkpoint", "refiner_switch_at")
"""The refiner's fields (``sdfleet.refiner``), the checkpoint found as SD WebUI finds one."""
_INPAINT = (
    "mask",
    "mask_blur_x",
    "mask_blur_y",
    "mask_blur",
    "mask_round",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "inpainting_mask_invert",
)
"""An img2img request's inpainting fields, handed over as they came (``sdfleet.inpaint``); the
mask's image goes to the runtime decoded."""


def decode_image_field(text: str) -> bytes:
    """An image field as SD WebUI reads it: base64 or a ``data:image/...;base64,`` URL. This server
    does not fetch URLs (SD WebUI's ``api_enable_requests`` off), and says so in SD WebUI's words."""
    if text.startswith(("http://", "https://")):
        raise refused(400, "Requests not allowed", sdwebui=500)
    if text.startswith("data:image/"):
        text = text.split(";", 1)[-1].split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as e:
        raise invalid_image() from e


def _kind(req: GenerationBody) -> TaskType:
    return TaskType.IMAGE_TO_IMAGE if isinstance(req, Img2ImgRequest) else TaskType.TEXT_TO_IMAGE


def _unsupported(req: GenerationBody) -> str | None:
    """What this server cannot do that the request turns on, if anything."""
    checks: list[tuple[bool, str]] = [
        (bool(req.restore_faces), "restore_faces (face restoration)"),
        (bool(req.script_name), f"script {req.script_name!r}"),
        (isinstance(req, Img2ImgRequest) and bool(req.latent_mask), "latent_mask"),
    ]
    found = next((what for on, what in checks if on), None)
    kind = _kind(req)
    off = off_defaults(req.model_dump(), kind, req.sampler_name or getattr(req, "sampler_index", None))
    return found or (", ".join(off) if off else None)


def _check(req: GenerationBody) -> None:
    what = _unsupported(req)
    if what is not None:
        raise refused(422, f"{what} is not available on this server")
    for name in req.alwayson_scripts:  # SD WebUI's words for a script it does not have
        raise refused(422, f"always on script {name} not found")
    if (req.width or 0) < 8 or (req.height or 0) < 8:
        raise refused(422, f"width and height must be at least 8, not {req.width}x{req.height}", sdwebui=500)
    if (req.steps or 0) < 1:
        raise refused(422, f"steps must be at least 1, not {req.steps}", sdwebui=500)
    if (req.batch_size or 0) < 1 or (req.n_iter or 0) < 1:
        raise refused(422, "batch_size and n_iter must be at least 1")
    if (req.batch_size or 1) * (req.n_iter or 1) > _MAX_IMAGES:
        raise refused(422, f"batch_size × n_iter is at most {_MAX_IMAGES} images on this server")


def _random_seed(value: int | None) -> int:
    # SD WebUI draws from randrange(4294967294) for -1 (and for None).
    return random.randrange(4294967294) if value is None or value == -1 else int(value)


def _setting(state: ServerState, req: GenerationBody, name: str) -> Any:
    """SD WebUI's option ``name`` for a request: its ``override_settings``' value where it has
    one (null included: handed on, for the runtime to refuse), else the option set."""
    overrides = req.override_settings or {}
    return overrides[name] if name in overrides else state.options[name]


def _emphasis(state: ServerState, req: GenerationBody) -> str:
    """SD WebUI's emphasis mode of a request: its ``override_settings``, else the option (a null
    override too: "None" is a mode)."""
    wanted = (req.override_settings or {}).get("emphasis")
    return str(wanted if wanted is not None else state.options["emphasis"])


def _noise_multiplier(state: ServerState, req: GenerationBody) -> Any:
    """An img2img request's noise multiplier as SD WebUI reads it: the field, else its
    ``override_settings``, else the option (None for txt2img; checked by the runtime)."""
    if not isinstance(req, Img2ImgRequest):
        return None
    if req.initial_noise_multiplier is not None:
        return req.initial_noise_multiplier
    return _setting(state, req, variation.MULTIPLIER)


def _refiner_options(state: ServerState, req: GenerationBody) -> dict[str, Any]:
    """SD WebUI's refiner options (``refiner.Options``) of a request where not their defaults:
    its ``override_settings``, else the options set."""
    found: dict[str, Any] = {}
    for name, default in ((refiner.PASS_OPTION, refiner.PASSES[0]), (refiner.BY_STEPS_OPTION, False)):
        value = _setting(state, req, name)
        if value != default:
            found[name] = value
    return found


def _skip(state: ServerState, req: GenerationBody) -> tuple[Any, dict[str, Any]]:
    """A request's skips of the negative prompt as SD WebUI reads them: NGMS's ``s_min_uncond``,
    else the option (its override comes too late: the request has read it); ``s_min_uncond_all``
    and ``skip_early_cond`` as overrides where set (its ``override_settings``, else the options):
    the field and the overrides to hand the runtime."""
    below = req.s_min_uncond if req.s_min_uncond is not None else state.options[ngms.FIELD]
    options = (ngms.ALL_OPTION, ngms.EARLY_OPTION)
    return below, {name: value for name in options if (value := _setting(state, req, name))}


def _model_and_clip(state: ServerState, req: GenerationBody) -> tuple[str | None, int]:
    overrides = req.override_settings or {}
    model = state.selected
    wanted = overrides.get("sd_model_checkpoint")
    if isinstance(wanted, str) and wanted:
        model = state.checkpoints.resolve(wanted).name
    clip = overrides.get(CLIP_SKIP)
    return model, clip_skip_value(clip) if clip is not None else state.options.clip_skip()


def _params(
    req: GenerationBody,
    runtime_sampler: str,
    seeds: tuple[int, int],
    clip: int,
    batch: int,
    tiling: bool,
    emphasis: str,
    refining: dict[str, Any],
    multiplier: Any = None,
    below: Any = None,
) -> TaskParams:
    """The runtime's parameters: ``n_iter`` batches of ``batch`` images (the runtime makes them in
    one call, with consecutive seeds), from ``seeds``: the seed and the variation seed;
    ``refining``: the refiner's options and the skips' as overrides (``_refiner_options``, ``_skip``);
    ``multiplier``: an img2img request's noise multiplier (``_noise_multiplier``); ``below``: its
    NGMS sigma (``_skip``)."""
    fields: dict[str, Any] = {
        "prompt": req.prompt or "",
        "negative_prompt": req.negative_prompt or "",
        "steps": req.steps,
        "width": (req.width or 0) // 8 * 8,
        "height": (req.height or 0) // 8 * 8,
        "cfg_scale": req.cfg_scale,
        "sampler": runtime_sampler,
        "seed": seeds[0],
        "batch_size": batch,
        "clip_skip": clip,
        "extra": {"n_iter": req.n_iter or 1, "tiling": tiling, "eta": req.eta, "subseed": seeds[1]}
        | {"styles": req.styles, ngms.FIELD: below}
        | {name: getattr(req, name) for name in _VARIATION}
        | {name: getattr(req, name) for name in _REFINER}
        | {name: getattr(req, name) for name in _CHURN}
        | {"override_settings": {"emphasis": emphasis} | refining},
    }
    if isinstance(req, Img2ImgRequest):
        fields["denoising_strength"] = req.denoising_strength
        fields["extra"]["resize_mode"] = req.resize_mode
        fields["extra"][variation.MULTIPLIER] = multiplier
        if req.mask:
            fields["extra"] |= {name: getattr(req, name) for name in _INPAINT}
    if isinstance(req, Txt2ImgRequest) and req.enable_hr:
        fields["extra"] |= {name: getattr(req, name) for name in _HIRES}
        if req.denoising_strength is not None:
            fields["denoising_strength"] = req.denoising_strength
    try:
        return TaskParams.model_validate(fields)
    except ValidationError as e:  # in the request's own field names, without pydantic's links
        names = {"sampler": "sampler_name", "clip_skip": "CLIP_stop_at_last_layers"}
        reasons = [
            f"{names.get(str(err['loc'][0]), err['loc'][0])}: {err['msg']} (got {err['input']!r})"
            if err["loc"]
            else str(err["msg"])
            for err in e.errors()
        ]
        raise refused(422, "; ".join(reasons)) from None


def _styled(state: ServerState, params: TaskParams) -> tuple[TaskParams, bool]:
    """``params`` with the request's prompt styles merged into its prompts, without ``styles``
    (the runtime is handed what to run), and whether it named any. 422 for a name ``styles.csv``
    lacks (SD WebUI takes it as an empty style)."""
    if not params.extra.get("styles"):
        return params, False
    try:
        styled = apply_styles(params, state.styles.all())
    except Reject as e:
        raise refused(422, e.reason) from None
    extra = {k: v for k, v in styled.extra.items() if k != "styles"}
    return styled.model_copy(update={"extra": extra}), True


async def prepare(state: ServerState, req: GenerationBody) -> tuple[Generation, TaskParams, str | None]:
    """The run's generation record, the runtime's parameters and the model; refuses first."""
    _check(req)
    sampler = resolve(req.sampler_name or req.sampler_index, req.scheduler)
    model, clip = _model_and_clip(state, req)
    batch = req.batch_size or 1
    if isinstance(req, Img2ImgRequest) and req.init_images and len(req.init_images) > 1:
        try:  # SD WebUI's rule: item i of each batch starts from input i
            batch = img2img_batch(len(req.init_images), batch)
        except Reject as e:
            raise failed(422, "RuntimeError", e.reason, sdwebui=500) from None
    images = batch * (req.n_iter or 1)
    seed, subseed = _random_seed(req.seed), _random_seed(req.subseed)
    tiling = bool(req.tiling if req.tiling is not None else state.options["tiling"])  # as SD WebUI
    emphasis = _emphasis(state, req)
    below, every = _skip(state, req)
    refining = _refiner_options(state, req) | every
    multiplier = _noise_multiplier(state, req)
    params = _params(
        req, sampler.runtime_key, (seed, subseed), clip, batch, tiling, emphasis, refining, multiplier, below
    )
    params, styled = _styled(state, params)
    kind = _kind(req)
    try:
        varied = variation.read(params)
        lacking = variation_unsupported(params, kind)
        inpaint.read(kind, params)
        ngms.read(params)
    except Reject as e:
        raise refused(422, e.reason) from None
    if lacking:
        raise refused(422, f"{', '.join(lacking)} is not available on this server")
    second = _hires(req, params)
    params = _second_sampler(req, _checkpoints(state, params, second))
    info = state.checkpoints.resolve(model) if model else None
    sha = await asyncio.to_thread(state.checkpoints.hash, info) if info else None
    gen = Generation(
        request=req,
        sampler=sampler,
        seeds=variation.seeds(seed, images, varied),
        subseeds=variation.consecutive(subseed, images),  # as the runtime makes them
        model_name=info.stem if info else None,
        model_hash=sha[:SHORT] if sha else None,
        clip_skip=clip,
        job_timestamp="0",
        options=state.options,
        batch_size=batch if batch != req.batch_size else None,
        tiling=tiling,
        styled=(params.prompt, params.negative_prompt) if styled else None,
    )
    if second is not None:  # SD WebUI's extra_generation_params of a hires fix
        gen.extra.update(second.generation_params)
    if emphasis_said(emphasis, _encoded(params)):  # the run says it again, with TI hashes
        gen.extra["Emphasis"] = emphasis
    gen.etas = etas_said(sampler.runtime_key, req.eta, second, params)
    gen.extra |= gen.etas[0] | gen.etas[1]  # said by the samplers, last (the run says them again)
    gen.refining = refiner.options(params.extra)  # read by _checkpoints
    gen.noise_multiplier = variation.noise_multiplier(kind, params)  # checked above
    return gen, params, model


def _encoded(params: TaskParams) -> list[str]:
    """The texts SD WebUI's text encoders read for a request: its prompts without extra-network
    tags, every text of their schedules (the prompts as sent where editing does not read: the
    run refuses it)."""
    try:
        edits, _ = PS.of_params(params)
    except Reject:
        return [params.prompt, params.negative_prompt]
    return [text for _, text in (*edits.negative, *edits.prompt)]


def _said_by_the_run(gen: Generation, info: dict[str, Any], options: Options) -> None:
    """The infotext's words only the run knows, from the runtime's ``info``, where SD WebUI puts
    them: inpainting's (``inpainting``: whether "Only masked" found a region), ``Lora hashes`` of
    the LoRAs it applied (unless the ``lora_add_hashes_to_infotext`` option is off), after the
    hires fix's words (its ``Hires checkpoint`` and ``Hires schedule type`` in the places kept
    for them); then its prompts'
    encoding's ``TI hashes`` (unless ``textual_inversion_add_hashes_to_infotext`` is off) and
    ``Emphasis`` in the order the run says them; then what is said while sampling: ``Noise
    multiplier``, the samplers' etas and the refiner's words, in their order
    (``refiner.said_while_sampling``); an inpainting checkpoint's ``Conditional mask weight``."""
    gen.conditional_mask_weight = info.get("conditional_mask_weight")
    if hires.SCHEDULE_WORD in gen.extra:  # its place, kept since the plan
        gen.extra[hires.SCHEDULE_WORD] = info.get("hires_schedule_type")
    if hires.CHECKPOINT_WORD in gen.extra:  # the same
        gen.extra[hires.CHECKPOINT_WORD] = info.get("hires_checkpoint")
    for word in {**gen.etas[0], **gen.etas[1]}:  # said again below, in the run's order
        gen.extra.pop(word, None)
    later: dict[str, Any] = {"Emphasis": gen.extra.pop("Emphasis")} if "Emphasis" in gen.extra else {}
    gen.extra |= info.get("inpainting") or {}
    if options["lora_add_hashes_to_infotext"] and info.get("lora_hashes"):
        gen.extra["Lora hashes"] = info["lora_hashes"]
    conditioning = info.get("conditioning")
    if isinstance(conditioning, dict):
        later = {k: v for k, v in later.items() if k != "Emphasis"}
        skip = set() if options["textual_inversion_add_hashes_to_infotext"] else {"TI hashes"}
        gen.extra |= {k: v for k, v in conditioning.items() if k not in skip}
    gen.extra |= later
    if gen.noise_multiplier != 1:  # said as the image-to-image sampling starts
        gen.extra["Noise multiplier"] = gen.noise_multiplier
    took = info.get("refiner")
    passes = info.get("refiner_passes") or (False, False)
    refined = (took[0], took[1]) if took else None
    hr = isinstance(gen.request, Txt2ImgRequest) and bool(gen.request.enable_hr)
    skipped: list[dict[str, Any]] = info.get("negative_skips") or [{}, {}]  # NGMS's, Skip Early CFG's
    skips = (dict(skipped[0]), dict(skipped[1]))
    gen.extra |= refiner.said_while_sampling(
        gen.refining, gen.etas, refined, (passes[0], passes[1]), hr, skips
    )


def _second_sampler(req: GenerationBody, params: TaskParams) -> TaskParams:
    """The runtime's parameters with a hires fix's own sampler or schedule type resolved as the
    first pass's are (``samplers.resolve``): ``DPM++ 2M`` runs with Karras, SD WebUI's default."""
    if (
        not isinstance(req, Txt2ImgRequest)
        or not req.enable_hr
        or not (req.hr_sampler_name or req.hr_scheduler)
    ):
        return params
    name = req.hr_sampler_name or req.sampler_name or req.sampler_index
    key = resolve(name, req.hr_scheduler or req.scheduler).runtime_key
    return params.model_copy(update={"extra": params.extra | {"hr_sampler_name": key, "hr_scheduler": None}})


def _hires(req: GenerationBody, params: TaskParams) -> hires.Hires | None:
    """A txt2img request's hires fix, its values and what this server lacks of it refused."""
    if not isinstance(req, Txt2ImgRequest) or not req.enable_hr:
        return None
    found = hires.unsupported(params)
    if found:
        raise refused(422, f"{', '.join(found)} (hires fix) is not available on this server")
    try:
        return hires.plan(TaskType.TEXT_TO_IMAGE, params)
    except Reject as e:
        raise refused(422, e.reason) from None


def _checkpoints(state: ServerState, params: TaskParams, second: hires.Hires | None) -> TaskParams:
    """``params`` with the hires fix's ``hr_checkpoint_name`` and the ``refiner_checkpoint``
    found as SD WebUI finds them (a title, file name, stem or known hash) and given to the
    runtime by their names in the folder; 404 for one the folder lacks, in SD WebUI's words (its
    status: 500), 422 for a refiner's value that makes no refiner."""
    try:
        wanted = refiner.read(params)
    except Reject as e:
        raise refused(422, e.reason) from None
    named = {
        "hr_checkpoint_name": second.checkpoint if second is not None else None,
        "refiner_checkpoint": wanted.checkpoint if wanted is not None else None,
    }
    found: dict[str, str] = {}
    for field, name in named.items():
        if name is None:
            continue
        try:
            found[field] = state.checkpoints.resolve(name).name
        except Reject:
            raise failed(
                404, "Exception", f"Could not find checkpoint with name {name}", sdwebui=500
            ) from None
    return params.model_copy(update={"extra": params.extra | found}) if found else params


async def generate(
    state: ServerState, req: GenerationBody, init_images: list[bytes], mask: bytes | None = None
) -> dict[str, Any]:
    """Run a txt2img/img2img request (``mask``: its inpainting mask, decoded); SD WebUI's answer
    (200 with what was made, also when interrupted)."""
    gen, params, model = await prepare(state, req)
    kind = _kind(req)
    job = "scripts_img2img" if kind is TaskType.IMAGE_TO_IMAGE else "scripts_txt2img"
    pngs: list[bytes] = []
    try:
        result = await state.run(
            kind, params, init_images, model=model, job=job, iterations=req.n_iter or 1, mask=mask
        )
        pngs = result.images
        _said_by_the_run(gen, result.info, state.options)
    except Interrupted:
        pass  # SD WebUI answers 200 with what it has; the runtime hands back no partial images
    finally:
        gen.job_timestamp = state.state.job_timestamp
    texts = [infotext.infotext(gen, i) for i in range(len(gen.seeds))]
    first = 0
    if grid.wanted(state.options, req.save_images, len(pngs)):
        batch = gen.batch_size or req.batch_size or 1
        pngs = [await asyncio.to_thread(grid.make, pngs, state.options, batch), *pngs]
        texts.insert(0, texts[0])  # SD WebUI's grid text: the first image's, with the main prompt
        first = 1
    keep_text = bool(state.options["enable_pnginfo"])
    images = [
        api_image(pnginfo.with_text(png, {"parameters": t} if keep_text else {}), state.options)
        for png, t in zip(pngs, texts, strict=False)
    ]
    parameters = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        parameters["init_images"] = parameters["mask"] = None
    return {
        "images": images if req.send_images else [],
        "parameters": parameters,
        "info": json.dumps(infotext.info(gen, texts, index_of_first_image=first)),
    }
