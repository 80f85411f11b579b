"""SD WebUI's hires fix as a text-to-image task asks for it: ``enable_hr`` and the ``hr_*`` fields of
``params.extra`` (their SD WebUI 1.10 API names and defaults), read into the second pass's size,
upscaler, steps, sampler and checkpoint. Torch-free: the API checks the size at the door (``limits``); the
diffusers runtime runs the two passes (``runtimes/_diffusers_hires.py``).

The second pass is SD WebUI's: the first pass's latents (``Latent`` upscalers) or images (any
other upscaler) made ``hr_scale`` times larger (or ``hr_resize_x`` × ``hr_resize_y``, keeping the
aspect ratio and cropping the excess), noised and denoised again as image-to-image at
``denoising_strength`` in ``hr_second_pass_steps`` steps (0: the first pass's), by the model
``hr_checkpoint_name`` names where it names one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sdfleet.errors import Reject
from sdfleet.tasks import TaskParams, TaskType

LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
"""SD WebUI's latent upscale modes: ``torch.nn.functional.interpolate``'s mode and antialias."""
SCALE_MAX = 8.0
UNSUPPORTED = ("firstpass_image",)
"""Hires fields the diffusers runtime does not implement: a first pass given as an image (SD WebUI
reads ``firstpass_image`` only with ``enable_hr``; its API cannot take one, see docs/runtimes.md)."""
PROMPTS = ("hr_prompt", "hr_negative_prompt")
"""The second pass's own prompt and negative prompt (empty: the first pass's)."""
_SAME_CHECKPOINT = (None, "", "Use same checkpoint")
SCHEDULE_WORD = "Hires schedule type"
CHECKPOINT_WORD = "Hires checkpoint"
PROMPT_WORDS = ("Hires prompt", "Hires negative prompt")


@dataclass(frozen=True)
class Hires:
    """A hires fix's second pass, as ``plan`` reads it from a task."""

    latent_width: int
    """The first pass's latents or images made this large (in latent pixels, 1/8 of an image's)."""
    latent_height: int
    crop_x: int
    """Latent columns cut from the upscaled latents, half each side (``hr_resize`` at another aspect)."""
    crop_y: int
    upscaler: str
    latent_mode: tuple[str, bool] | None
    """``torch.nn.functional.interpolate``'s mode and antialias; None: an image upscaler."""
    steps: int
    """The second pass's denoising steps."""
    denoising: float
    sampler: str | None
    """The second pass's sampler and schedule type; None: the first pass's."""
    scheduler: str | None
    checkpoint: str | None
    """The second pass's checkpoint as named (``hr_checkpoint_name``); None: the first pass's."""
    generation_params: tuple[tuple[str, Any], ...]
    """What the infotext adds, in SD WebUI's words and order (``CHECKPOINT_WORD`` and
    ``SCHEDULE_WORD`` hold their places: the run says them)."""

    @property
    def size(self) -> tuple[int, int]:
        """The images it makes, (width, height)."""
        return (self.latent_width - self.crop_x) * 8, (self.latent_height - self.crop_y) * 8


def asked(kind: TaskType, params: TaskParams) -> bool:
    return kind is TaskType.TEXT_TO_IMAGE and params.extra.get("enable_hr") is True


def plan(kind: TaskType, params: TaskParams) -> Hires | None:
    """The second pass a text-to-image task asks for; None without ``enable_hr``. ``Reject``
    (``invalid_params``) for a value SD WebUI would fail on or that makes no image."""
    if not asked(kind, params):
        return None
    extra = params.extra
    to_x, to_y, crop_x, crop_y, said = _target(params)
    given = extra.get("hr_upscaler")
    if given is not None and not isinstance(given, str):
        raise Reject(f"hr_upscaler must be a name, not {given!r}", code="invalid_params")
    upscaler = given or "Latent"  # SD WebUI's default mode
    steps = _count(extra, "hr_second_pass_steps")
    if params.denoising_strength <= 0:
        raise Reject("a hires pass needs denoising_strength above 0", code="invalid_params")
    sampler, scheduler = extra.get("hr_sampler_name"), extra.get("hr_scheduler")
    # the infotext's words, in SD WebUI's order
    params_said: list[tuple[str, Any]] = [("Denoising strength", params.denoising_strength)]
    checkpoint = checkpoint_of(params)
    params_said += [(CHECKPOINT_WORD, None)] if checkpoint else []  # its title, once it is found
    if sampler and sampler != params.sampler:
        params_said.append(("Hires sampler", sampler))
    # the second pass's own prompts where they are not the first pass's, and SD WebUI's place for
    # the schedule it ran where that is not the first pass's (the run says it)
    firsts = (params.prompt, params.negative_prompt)
    own = prompts(params) or firsts
    params_said += [(w, o if o != f else None) for w, o, f in zip(PROMPT_WORDS, own, firsts, strict=True)]
    params_said.append((SCHEDULE_WORD, None))
    params_said.append(said)
    params_said += [("Hires steps", steps)] if steps else []
    params_said += [("Hires upscaler", given)] if given else []
    return Hires(
        latent_width=to_x // 8,
        latent_height=to_y // 8,
        crop_x=crop_x,
        crop_y=crop_y,
        upscaler=upscaler,
        latent_mode=LATENT_MODES.get(upscaler),
        steps=steps or params.steps,
        denoising=params.denoising_strength,
        sampler=sampler if isinstance(sampler, str) and sampler else None,
        scheduler=scheduler if isinstance(scheduler, str) and scheduler else None,
        checkpoint=checkpoint,
        generation_params=tuple(params_said),
    )


def _target(params: TaskParams) -> tuple[int, int, int, int, tuple[str, Any]]:
    """SD WebUI's ``calculate_target_resolution``: the upscaled size, the latent pixels to crop,
    and what the infotext says of it."""
    extra = params.extra
    scale = _number(extra, "hr_scale", 2.0)
    if not 0 < scale <= SCALE_MAX:
        wrong = f"hr_scale must be above 0 and at most {SCALE_MAX:g}, not {scale:g}"
        raise Reject(wrong, code="invalid_params")
    resize_x, resize_y = _count(extra, "hr_resize_x"), _count(extra, "hr_resize_y")
    w, h = params.width, params.height
    crop_x = crop_y = 0
    if resize_x == 0 and resize_y == 0:
        to_x, to_y = int(w * scale), int(h * scale)
        said: tuple[str, Any] = ("Hires upscale", scale)
    else:  # fit the aspect ratio; with both given, crop what is over
        said = ("Hires resize", f"{resize_x}x{resize_y}")
        if resize_y == 0 or (resize_x and w / h < resize_x / resize_y):
            to_x, to_y = resize_x, resize_x * h // w
        else:
            to_x, to_y = resize_y * w // h, resize_y
        if resize_x and resize_y:
            crop_x, crop_y = (to_x - resize_x) // 8, (to_y - resize_y) // 8
    if to_x < 8 or to_y < 8:
        raise Reject(f"the hires pass would be {to_x}x{to_y}: at least 8x8", code="invalid_params")
    return to_x, to_y, crop_x, crop_y, said


def checkpoint_of(params: TaskParams) -> str | None:
    """The checkpoint ``hr_checkpoint_name`` names for the second pass; None for the first pass's
    (none, empty or SD WebUI's "Use same checkpoint"). ``Reject`` (``invalid_params``) for one
    that is no text."""
    name = params.extra.get("hr_checkpoint_name")
    if name is not None and not isinstance(name, str):
        raise Reject(f"hr_checkpoint_name must be a name, not {name!r}", code="invalid_params")
    return None if name in _SAME_CHECKPOINT else name


def sampler_of(second: Hires, params: TaskParams) -> tuple[str | None, str | None]:
    """The second pass's sampler and schedule type: its own, else the first pass's."""
    return second.sampler or params.sampler, second.scheduler or params.extra.get("scheduler")


def prompts(params: TaskParams) -> tuple[str, str] | None:
    """The second pass's own prompt and negative prompt (``hr_prompt``, ``hr_negative_prompt``;
    empty or null: the first pass's), None where both are the first pass's. ``Reject``
    (``invalid_params``) for one that is no text."""
    given = [params.extra.get(field) for field in PROMPTS]
    for field, value in zip(PROMPTS, given, strict=True):
        if value is not None and not isinstance(value, str):
            raise Reject(f"{field} must be a text, not {value!r}", code="invalid_params")
    own = (given[0] or params.prompt, given[1] or params.negative_prompt)
    return None if own == (params.prompt, params.negative_prompt) else own


def unsupported(params: TaskParams) -> list[str]:
    """The hires fields set to what the diffusers runtime does not do (``UNSUPPORTED``)."""
    return ["firstpass_image"] if params.extra.get("firstpass_image") else []


def second_pass_steps(steps: int, denoising: float) -> int:
    """The schedule length whose last ``steps`` steps an image-to-image pass at ``denoising``
    runs (SD WebUI runs exactly the hires steps asked for, over a schedule ``steps / denoising``
    long; diffusers runs ``int(schedule × strength)`` of it)."""
    strength = min(denoising, 0.999)
    schedule = math.ceil(steps / strength)
    while int(schedule * strength) < steps:
        schedule += 1
    return schedule


def _number(extra: dict[str, Any], key: str, default: float) -> float:
    value = extra.get(key, default)
    if value is None:
        return default
    if type(value) not in (int, float) or not math.isfinite(value):
        raise Reject(f"{key} must be a number, not {value!r}", code="invalid_params")
    return float(value)


def _count(extra: dict[str, Any], key: str) -> int:
    value = extra.get(key, 0)
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise Reject(f"{key} must be a whole number from 0, not {value!r}", code="invalid_params")
    return value
