"""What an extras task asks for, read as SD WebUI's ``/sdapi/v1/extra-*`` reads it: the upscaler
(``upscaler`` / ``upscaler_1``), an optional second one blended in
(``upscaler_2``, ``extras_upscaler_2_visibility``), and the size: ``upscaling_resize`` times the
input (``resize_mode`` 0) or ``upscaling_resize_w`` × ``upscaling_resize_h`` (``resize_mode`` 1,
cropped to it from the centre unless ``upscaling_crop`` is false). Keys other than ``upscaler`` and
``upscaling_resize`` come in ``TaskParams.extra``. Face restoration (GFPGAN, CodeFormer) is refused,
not ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sdfleet.errors import Reject
from sdfleet.runtimes import _diffusers_upscale as U
from sdfleet.runtimes.base import Job

Upscaler = Image.Resampling | U.ModelUpscaler
_FACE_RESTORERS = ("gfpgan_visibility", "codeformer_visibility")


@dataclass(frozen=True)
class Plan:
    first: Upscaler
    name: str
    """The first upscaler's name, as ``info`` reports it."""
    factor: float
    second: Upscaler | None = None
    visibility: float = 0.0
    to: tuple[int, int] | None = None
    """``resize_mode`` 1: the asked width and height."""
    crop: bool = True

    @property
    def on_device(self) -> bool:
        return any(isinstance(u, U.ModelUpscaler) for u in (self.first, self.second))

    def target(self, size: tuple[int, int]) -> tuple[int, int]:
        """The size the upscalers make of an input of ``size`` (before any crop)."""
        if self.to is None:
            return U.target_size(size, self.factor)
        scale = max(self.to[0] / size[0], self.to[1] / size[1])
        return U.target_size(size, scale)

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"upscaler": self.name, "upscaling_resize": self.factor}
        if self.second is not None:
            info |= {"upscaler_2": _name(self.second), "extras_upscaler_2_visibility": self.visibility}
        if self.to is not None:
            info |= {
                "upscaling_resize_w": self.to[0],
                "upscaling_resize_h": self.to[1],
                "upscaling_crop": self.crop,
            }
        return info


def plan(job: Job, models_dir: Path) -> Plan:
    """The job's plan, checked before it waits for the device. Raises ``Reject``."""
    p, extra = job.params, job.params.extra
    for key in _FACE_RESTORERS:
        if _number(extra, key, 0.0) > 0:
            raise Reject(
                f"{key}: face restoration (GFPGAN, CodeFormer) is not available in the diffusers runtime",
                code="invalid_params",
            )
    first = U.resolve(p.upscaler, models_dir)
    name = first.name if isinstance(first, U.ModelUpscaler) else (p.upscaler or "Lanczos")
    second, visibility = None, _number(extra, "extras_upscaler_2_visibility", 0.0)
    if not 0 <= visibility <= 1:
        raise Reject("extras_upscaler_2_visibility must be between 0 and 1", code="invalid_params")
    second_name = extra.get("upscaler_2")
    if visibility > 0 and second_name not in (None, "None"):
        second = U.resolve(str(second_name), models_dir)
    mode = extra.get("resize_mode", 0)
    if mode not in (0, 1):
        raise Reject(
            f"resize_mode must be 0 (by upscaling_resize) or 1 (to a size), not {mode!r}",
            code="invalid_params",
        )
    to = (_size(extra, "upscaling_resize_w"), _size(extra, "upscaling_resize_h")) if mode == 1 else None
    crop = bool(extra.get("upscaling_crop", True))
    return Plan(first, name, p.upscaling_resize, second, visibility, to, crop)


def _name(upscaler: Upscaler) -> str:
    if isinstance(upscaler, U.ModelUpscaler):
        return upscaler.name
    return "Nearest" if upscaler is Image.Resampling.NEAREST else "Lanczos"


def _number(extra: Mapping[str, Any], key: str, default: float) -> float:
    value = extra.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Reject(f"{key} must be a number, not {value!r}", code="invalid_params")
    return float(value)


def _size(extra: Mapping[str, Any], key: str) -> int:
    value = extra.get(key, 512)  # SD WebUI's default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16384:
        raise Reject(
            f"{key} must be a whole number of pixels from 1 to 16384, not {value!r}", code="invalid_params"
        )
    return value
