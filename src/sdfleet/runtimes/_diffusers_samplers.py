"""The diffusers runtime's samplers by SD WebUI name: what ``make_scheduler`` builds, and what the
API checks at the door for a task routed to a diffusers queue. No torch or diffusers here, so the
API can ask without loading either."""

from __future__ import annotations

import math
from typing import Any

from sdfleet import hires
from sdfleet.errors import Reject
from sdfleet.tasks import TaskParams

# A1111 sampler name → diffusers scheduler class and the config it needs.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "Heun Karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
    # SD WebUI's UniPC (its own, ``uni_pc``) at its options' defaults: order 3, variant bh1, the
    # lower order at the end; time-uniform from 999 to the model's first timestep
    # (``_diffusers_unipc`` makes its times exactly, but for fewer steps than its order)
    "UniPC": (
        "UniPCMultistepScheduler",
        {
            "solver_order": 3,
            "solver_type": "bh1",
            "lower_order_final": True,
            "timestep_spacing": "linspace",
            "steps_offset": 0,
            "final_sigmas_type": "sigma_min",
        },
    ),
    "DEIS": ("DEISMultistepScheduler", {}),
}
_BY_LOWER = {name.lower(): name for name in SAMPLERS}
_NO_SIGMAS = frozenset({"DDIM", "PLMS", "PNDM", "UniPC", "DEIS"})
"""Not k-diffusion samplers: SD WebUI takes a schedule type for them and leaves it unused."""


UNIPC_ORDER = 3
"""SD WebUI's ``uni_pc_order`` (its default): its UniPC refuses fewer steps (``assert steps >= order``)."""

BY_TIMESTEP = frozenset(
    {"DDIMScheduler", "PNDMScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"}
)
"""The diffusers schedulers of the samplers SD WebUI runs on the model's timesteps (its DDIM, PLMS,
UniPC; DEIS, which SD WebUI lacks, beside them): how far a pass has come is read from its timestep,
not a sigma (the refiner's switch, NGMS)."""


def total_of(scheduler: Any, passes: int) -> int:
    """SD WebUI's ``total_steps`` of a call of ``passes`` UNet passes on ``scheduler``: the passes,
    one more for a second-order sampler, whose last step is one pass (Heun makes 2n - 1 for n
    steps, counted of 2n); what a scheduler on SD WebUI's timesteps says where it says
    (``_diffusers_timesteps``: DDIM's 8 steps are 7 passes, counted of 8)."""
    said = getattr(scheduler, "sd_webui_total_steps", None)
    if said is not None:
        return int(said)
    order = int(scheduler.order)
    return math.ceil(passes / order) * order


def by_timestep(scheduler: Any) -> bool:
    """Whether how far ``scheduler``'s pass has come is read from its timestep: one of
    ``BY_TIMESTEP`` (or sdfleet's subclass of one), or a scheduler without sigmas."""
    kinds = {kind.__name__ for kind in type(scheduler).__mro__}
    return not kinds.isdisjoint(BY_TIMESTEP) or not hasattr(scheduler, "sigmas")


def k_diffusion(key: str) -> bool:
    """Whether sampler ``key`` (a ``SAMPLERS`` key) is one of SD WebUI's k-diffusion samplers, which
    step from the model's last timestep (999) to 0 in equal steps (k-diffusion's ``get_sigmas``);
    its timestep samplers (DDIM, PLMS, UniPC) step from the first timestep past 0 (``leading``)."""
    return key.removesuffix(" Karras") not in _NO_SIGMAS


SCHEDULES = ("Automatic", "Uniform", "Karras")
"""SD WebUI's schedule types (``scheduler``) this runtime runs: its default spacing, or Karras sigmas."""


def sampler_key(sampler: str | None, scheduler: object = None) -> str | None:
    """The canonical A1111 sampler name; ``scheduler="Karras"`` (newer A1111 API) adds Karras sigmas.
    ``Reject`` for a sampler or schedule type this runtime does not run, rather than running
    another: ``unknown_sampler``, ``unknown_scheduler`` (also Karras for a sampler without it)."""
    if sampler is None:
        return None
    name = _BY_LOWER.get(sampler.strip().lower())
    if name is None:
        raise Reject(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}", code="unknown_sampler")
    schedule = str(scheduler or "").strip().lower()  # a message past the API may hold any JSON
    if schedule not in ("", "automatic", "uniform", "karras"):
        known = ", ".join(SCHEDULES)
        raise Reject(f"unknown schedule type {scheduler!r}; known: {known}", code="unknown_scheduler")
    if schedule != "karras" or name in _NO_SIGMAS or name.endswith(" Karras"):
        return name
    if f"{name} Karras" in SAMPLERS:
        return f"{name} Karras"
    raise Reject(f"schedule type 'Karras' is not available for sampler {name!r}", code="unknown_scheduler")


_SECOND_ORDER = frozenset({"Heun", "DPM2", "DPM2 a", "DPM++ SDE"})
"""Samplers that pass through the UNet twice a step: SD WebUI schedules prompt editing over twice
the steps for them (``total_steps``)."""
_KARRAS_BY_DEFAULT = frozenset({"DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM2", "DPM2 a"})
"""Samplers whose ``Automatic`` schedule in SD WebUI 1.10 is not their own spacing (Karras; for
DPM++ 2M SDE, Exponential): run here without Karras, they are its ``Uniform``."""


def said(key: str, scheduler: object = None) -> tuple[str, str]:
    """SD WebUI 1.10's ``Sampler`` and ``Schedule type`` for sampler ``key`` (a ``sampler_key``)
    run for a request that named schedule type ``scheduler``: the schedule the steps followed,
    in the words that make SD WebUI follow it again (DDIM, PLMS, UniPC: the one named, unused)."""
    name = key.removesuffix(" Karras")
    if name != key and name not in _NO_SIGMAS:
        return name, "Karras"
    if name in _KARRAS_BY_DEFAULT:
        return name, "Uniform"
    named = str(scheduler or "").strip().lower()
    return name, next((label for label in SCHEDULES if label.lower() == named), "Automatic")


def eta_said(key: str, eta: float | None) -> dict[str, float]:
    """SD WebUI's infotext word of ``eta``: ``Eta DDIM``, DDIM's when it is not its default 0;
    ``Eta``, Euler a's when it is not its 1 (other samplers' steps do not take one here; those
    that take one in SD WebUI are refused one other than 1)."""
    if key == "DDIM" and eta is not None and eta != 0:
        return {"Eta DDIM": float(eta)}
    return {"Eta": float(eta)} if key == "Euler a" and eta is not None and eta != 1 else {}


def etas_said(
    key: str, eta: float | None, second: hires.Hires | None, params: TaskParams
) -> tuple[dict[str, float], dict[str, float]]:
    """``eta_said`` of a task's sampler (``key``), and of its hires pass's (``second``) where it
    has one: SD WebUI says each when that pass's sampler starts."""
    if second is None:
        return eta_said(key, eta), {}
    return eta_said(key, eta), eta_said(sampler_key(*hires.sampler_of(second, params)) or key, eta)


def hires_said(first: str, first_scheduler: object, second: str, second_scheduler: object) -> str | None:
    """SD WebUI's ``Hires schedule type``: the schedule a hires fix's second pass (sampler key
    ``second``, schedule type ``second_scheduler``) ran, where it is one of its own (not
    Automatic, and a k-diffusion sampler's) and not the one the first pass said."""
    name, label = said(second, second_scheduler)
    if name in _NO_SIGMAS or label == "Automatic":
        return None
    first_name, first_label = said(first, first_scheduler)
    return None if first_name not in _NO_SIGMAS and first_label == label else label


def img2img_schedule(key: str | None, steps: int, strength: float) -> tuple[int, float]:
    """The steps and strength to give a diffusers image-to-image call of sampler ``key`` so that it
    denoises as SD WebUI 1.10's does at ``strength``. Its k-diffusion samplers denoise
    ``int(min(strength, 0.999) × steps) + 1`` steps, from that many before the schedule's end
    (``setup_img2img_steps``, ``sigmas[steps - t_enc - 1:]``), one more than diffusers' strength
    makes (``get_timesteps``: ``int(steps × strength)``), from a higher sigma; its timestep
    samplers (DDIM, PLMS, UniPC) its ``t_enc`` from the timestep below its noise where the call can
    start there (``timestep_start``); elsewhere, and for a task naming no sampler (the model's own
    scheduler: ``key`` None), as diffusers, with enough steps that it makes one. ``Reject``
    (``invalid_params``) for a strength of 0 or less."""
    if strength <= 0:
        raise Reject("denoising_strength must be above 0 for image-to-image", code="invalid_params")
    t_enc = int(min(strength, 0.999) * steps)
    if key is not None and (start := timestep_start(key, steps, t_enc)) is not None:
        return steps, start
    if key is None or key.removesuffix(" Karras") in _NO_SIGMAS:
        return max(steps, math.ceil(1 / strength)), strength
    return steps, _running(steps, t_enc + 1)


def hires_schedule(key: str | None, steps: int, strength: float) -> tuple[int, float]:
    """The schedule length and strength to give a hires fix's second pass of sampler ``key`` (its
    diffusers image-to-image call) so that it runs ``steps`` steps as SD WebUI 1.10's does at
    ``strength``. SD WebUI's k-diffusion samplers run the last ``steps`` of a schedule
    ``int(steps / min(strength, 0.999))`` long (``setup_img2img_steps`` given the steps), and its
    timestep samplers ``t_enc = steps - 1`` of it (``timestep_start``) where the call can start
    there; elsewhere, and for a task naming no sampler (``key`` None), as diffusers, over the
    shortest schedule of which ``strength`` makes ``steps`` (``hires.second_pass_steps``)."""
    schedule = int(steps / min(strength, 0.999))
    if key is not None and (start := timestep_start(key, schedule, steps - 1)) is not None:
        return schedule, start
    if key is None or not k_diffusion(key):
        return hires.second_pass_steps(steps, strength), strength
    return schedule, _running(schedule, steps)


def timestep_start(key: str, steps: int, t_enc: int) -> float | None:
    """The strength at which a diffusers image-to-image call of ``steps`` with SD WebUI's timestep
    sampler ``key`` (DDIM, PLMS, UniPC) starts where SD WebUI's ``sample_img2img`` does: its input
    noised to ``timesteps[t_enc]`` of ``clipped_timesteps(steps)``, then DDIM's and PLMS's
    evaluations from ``timesteps[t_enc - 1]`` (``t_enc - 1`` steps), UniPC's ``t_enc`` steps from
    there. The strength skips the entries of the scheduler's list above those (DDIM's has one for
    each timestep but the first, and runs ``t_enc - 1``; PLMS's one more, its first step's second
    evaluation, and runs ``t_enc``; UniPC's one for each timestep, and runs ``t_enc``), which the
    scheduler then writes its own into (``_diffusers_timesteps``, ``_diffusers_unipc``). None for
    another sampler, where SD WebUI's evaluates nothing (it answers the noised input) or refuses
    (UniPC below its order), where diffusers' step cannot follow SD WebUI's timesteps
    (``sd_webui_timesteps`` None: DDIM, PLMS), or where diffusers' slicing cannot skip that many
    (``get_timesteps`` skips 1 to ``steps - 1``)."""
    ours = key.removesuffix(" Karras")
    timesteps = None
    if ours == "UniPC" and t_enc >= UNIPC_ORDER:
        timesteps = clipped_timesteps(steps)
    elif ours in ("DDIM", "PLMS") and t_enc >= 2:
        timesteps = sd_webui_timesteps(steps)
    if timesteps is None or not 1 <= len(timesteps) - t_enc <= steps - 1:
        return None
    return _running(steps, steps - (len(timesteps) - t_enc))


def clipped_timesteps(steps: int) -> list[int]:
    """SD WebUI 1.10's timesteps for its timestep samplers of ``steps`` as it makes them
    (``CompVisSampler.get_timesteps``): from 1 every ``1000 // steps``, as many as lie below 1000,
    clipped to 999. Its UniPC runs as many steps as there are (16 for 15 steps, 167 for 150), its
    image-to-image from these (``_diffusers_unipc``)."""
    return [min(t, 999) for t in _timesteps(steps)]


def sd_webui_timesteps(steps: int) -> list[int] | None:
    """SD WebUI 1.10's timesteps for its timestep samplers (DDIM, PLMS) of ``steps``
    (``CompVisSampler.get_timesteps``): from 1 every ``1000 // steps``, as many as lie below 1000
    (31 for 30 steps, 167 for 150). They evaluate the model at each but the first, from the last
    down, and step from the second to the first (to timestep 1, not 0). None where diffusers' DDIM
    and PLMS cannot step over them: 1 or 2 steps (one evaluation or none), and where the last is
    1000, which SD WebUI clips to 999 (3, 9, 27, 36, 37, 101-111, 251-333 steps): its first step
    is then one timestep shorter than the others, and diffusers' step is always ``1000 // steps``."""
    timesteps = _timesteps(steps)
    return timesteps if len(timesteps) >= 3 and timesteps[-1] <= 999 else None


def _timesteps(steps: int) -> list[int]:
    """SD WebUI's timesteps of ``steps`` before it clips them: from 1 every ``1000 // steps``."""
    return [t + 1 for t in range(0, 1000, max(1000 // steps, 1))]


def _running(schedule: int, steps: int) -> float:
    """The strength at which diffusers' image-to-image runs the last ``steps`` of ``schedule``
    (``get_timesteps``: ``int(schedule × strength)``)."""
    given = min(steps / schedule, 1.0)
    while int(schedule * given) < steps:  # a quotient rounded down: the next float up
        given = math.nextafter(given, 2.0)
    return given


def total_steps(key: str | None, steps: int) -> int:
    """The steps SD WebUI schedules prompt editing over for sampler ``key`` (its ``total_steps``):
    twice ``steps`` for a second-order sampler (Heun, DPM2), whose passes its denoiser counts."""
    return steps * 2 if key is not None and key.removesuffix(" Karras") in _SECOND_ORDER else steps
