"""SD WebUI 1.10's samplers and schedule types, as far as the diffusers runtime can run them.

SD WebUI lists base names ("DPM++ 2M") with ``aliases`` and a default schedule in
``options.scheduler``, and takes the schedule from the request's ``scheduler`` or from a label at
the end of the name ("DPM++ 2M Karras"). Both forms resolve here to one of the diffusers runtime's
sampler keys. Unlike SD WebUI, which silently falls back to DPM++ 2M (or Automatic) for a name it
does not know, an unknown or unavailable name is refused with the list of what is available.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdfleet.runtime_server.errors import refused


@dataclass(frozen=True)
class Sampler:
    name: str
    aliases: tuple[str, ...]
    options: dict[str, str] = field(default_factory=dict)
    karras: bool = False
    """The diffusers runtime has a Karras variant ("<name> Karras")."""
    sigmas: bool = True
    """A k-diffusion sampler in SD WebUI (its schedule type applies); False for DDIM, PLMS, UniPC."""

    @property
    def default_schedule(self) -> str:
        return self.options.get("scheduler", "automatic")


@dataclass(frozen=True)
class Schedule:
    name: str
    label: str
    aliases: tuple[str, ...] | None = None
    default_rho: float = -1.0
    need_inner_model: bool = False


# SD WebUI's own entries (name, aliases, options), for the samplers the diffusers runtime has.
# DPM++ 2M SDE defaults to Karras here: SD WebUI's default for it (exponential) is not available.
SAMPLERS = (
    Sampler("DPM++ 2M", ("k_dpmpp_2m",), {"scheduler": "karras"}, karras=True),
    Sampler(
        "DPM++ SDE",
        ("k_dpmpp_sde",),
        {"scheduler": "karras", "second_order": "True", "brownian_noise": "True"},
        karras=True,
    ),
    Sampler(
        "DPM++ 2M SDE", ("k_dpmpp_2m_sde",), {"scheduler": "karras", "brownian_noise": "True"}, karras=True
    ),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), {"uses_ensd": "True"}),
    Sampler("Euler", ("k_euler",), karras=True),
    Sampler("LMS", ("k_lms",), karras=True),
    Sampler("Heun", ("k_heun",), {"second_order": "True"}, karras=True),
    Sampler(
        "DPM2",
        ("k_dpm_2",),
        {"scheduler": "karras", "discard_next_to_last_sigma": "True", "second_order": "True"},
        karras=True,
    ),
    Sampler(
        "DPM2 a",
        ("k_dpm_2_a",),
        {
            "scheduler": "karras",
            "discard_next_to_last_sigma": "True",
            "uses_ensd": "True",
            "second_order": "True",
        },
        karras=True,
    ),
    Sampler("DDIM", ("ddim",), sigmas=False),
    Sampler("PLMS", ("plms",), sigmas=False),
    Sampler("UniPC", ("unipc",), sigmas=False),
)
SCHEDULES = (
    Schedule("automatic", "Automatic"),
    Schedule("uniform", "Uniform", need_inner_model=True),
    Schedule("karras", "Karras", default_rho=7.0),
)
# Every schedule label SD WebUI 1.10 knows, to split "<sampler> <schedule>" names.
_SD_WEBUI_SCHEDULES = {
    "Automatic": "automatic",
    "Uniform": "uniform",
    "Karras": "karras",
    "Exponential": "exponential",
    "Polyexponential": "polyexponential",
    "SGM Uniform": "sgm_uniform",
    "SGMUniform": "sgm_uniform",
    "KL Optimal": "kl_optimal",
    "Align Your Steps": "align_your_steps",
    "Simple": "simple",
    "Normal": "normal",
    "DDIM": "ddim",
    "Beta": "beta",
}
_BY_NAME = {s.name: s for s in SCHEDULES}


@dataclass(frozen=True)
class Resolved:
    sampler: str
    """SD WebUI's base name, as ``info.sampler_name`` reports it."""
    schedule_label: str
    """The ``Schedule type`` label of the request ("Automatic" unless one was named)."""
    schedule_param: str | None
    """The label SD WebUI puts in ``extra_generation_params`` (the schedule actually used), if any."""
    runtime_key: str
    """The diffusers runtime's sampler name."""


def sampler_items() -> list[dict[str, object]]:
    return [{"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)} for s in SAMPLERS]


def schedule_items() -> list[dict[str, object]]:
    return [
        {
            "name": s.name,
            "label": s.label,
            "aliases": list(s.aliases) if s.aliases else None,
            "default_rho": s.default_rho,
            "need_inner_model": s.need_inner_model,
        }
        for s in SCHEDULES
    ]


def _schedule(name: str) -> str:
    lowered = name.strip().lower()
    for label, key in _SD_WEBUI_SCHEDULES.items():
        if lowered in (label.lower(), key):
            if key not in _BY_NAME:
                raise refused(
                    400, f"Schedule type {name!r} is not available; available: {_available_schedules()}"
                )
            return key
    raise refused(400, f"Scheduler not found: {name!r}; available: {_available_schedules()}")


def _available_schedules() -> str:
    return ", ".join(s.label for s in SCHEDULES)


def _split_schedule(name: str) -> tuple[str, str | None]:
    for label in _SD_WEBUI_SCHEDULES:
        if name.endswith(" " + label):
            return name[: -len(label) - 1], label
    return name, None


def _sampler(name: str) -> Sampler:
    lowered = name.strip().lower()
    for s in SAMPLERS:
        if lowered == s.name.lower() or lowered in (a.lower() for a in s.aliases):
            return s
    available = ", ".join(s.name for s in SAMPLERS)
    raise refused(400, f"Sampler not found: {name!r}; available: {available}")


def resolve(sampler_name: str, scheduler: str | None) -> Resolved:
    """The sampler and schedule of a request; ``SdApiError`` 400 for a name not available here."""
    base, suffix = _split_schedule(sampler_name.strip())
    sampler = _sampler(base)
    named = suffix or (scheduler if scheduler and scheduler.strip() else None)
    schedule = _schedule(named) if named else "automatic"
    effective = sampler.default_schedule if schedule == "automatic" else schedule
    if not sampler.sigmas:
        effective = "automatic"  # DDIM, PLMS, UniPC: SD WebUI takes a schedule type and leaves it unused
    if effective == "karras" and not sampler.karras:
        raise refused(400, f"Schedule type 'Karras' is not available for sampler {sampler.name!r}")
    label = _BY_NAME[schedule].label if named else "Automatic"
    param = _BY_NAME[effective].label if sampler.sigmas and effective != "automatic" else None
    key = f"{sampler.name} Karras" if effective == "karras" else sampler.name
    return Resolved(sampler.name, label, param, key)
