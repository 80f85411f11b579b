"""SD WebUI's variation seeds as a task asks for them: ``subseed``, ``subseed_strength`` and
``seed_resize_from_w``/``_h`` in ``params.extra`` (their SD WebUI 1.10 API names and defaults), and
an image-to-image task's ``initial_noise_multiplier``. Torch-free: the API checks them at the door;
the diffusers runtime makes the noise (``runtimes/_diffusers_noise.py``).

A variation starts each image from its seed's noise moved towards its variation seed's by
``subseed_strength`` along a great circle (0: the seed's, 1: the variation seed's); SD WebUI then
gives every image of the task the same seed and consecutive variation seeds, so a batch shows
variations of one image. ``seed_resize_from`` makes the seed's noise at another size and sets it in
the middle of the image's own (the same composition at another size).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from sdfleet.errors import Reject
from sdfleet.tasks import TaskParams, TaskType

_SEEDS = 2**32


@dataclass(frozen=True)
class Variation:
    """What a task asks of its starting noise, as ``read`` finds it."""

    strength: float
    """``subseed_strength``: 0 leaves the seeds' noise as it is."""
    subseed: int
    """The first image's variation seed; -1: a random one."""
    resize_from: tuple[int, int] | None
    """``seed_resize_from`` (width, height); None: the image's own size."""

    @property
    def key(self) -> tuple[float, tuple[int, int] | None]:
        """What one pipeline call shares (each image keeps its own seeds)."""
        return self.strength, self.resize_from


def read(params: TaskParams) -> Variation | None:
    """The variation ``params`` asks for; None when neither a strength nor a resize is asked.
    ``Reject`` (``invalid_params``) for a value SD WebUI's request model would refuse or that is no
    seed or size (a message published past the API may hold anything)."""
    extra = params.extra
    strength = extra.get("subseed_strength")
    if strength is None:
        strength = 0.0
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
        raise Reject(f"subseed_strength must be a number, not {strength!r}", code="invalid_params")
    width, height = _side(extra, "seed_resize_from_w"), _side(extra, "seed_resize_from_h")
    resize = (width, height) if width > 0 and height > 0 else None  # SD WebUI's rule: both, or none
    if strength == 0 and resize is None:
        return None
    subseed = extra.get("subseed")
    subseed = -1 if subseed is None else subseed
    if type(subseed) is not int or not -1 <= subseed < _SEEDS:
        raise Reject(
            f"subseed must be an integer from -1 to {_SEEDS - 1}, not {subseed!r}", code="invalid_params"
        )
    return Variation(float(strength), subseed, resize)


MULTIPLIER = "initial_noise_multiplier"
"""SD WebUI's image-to-image request field, and the option of the same name it falls back to."""


def noise_multiplier(kind: TaskType, params: TaskParams) -> float:
    """What an image-to-image task's starting noise is multiplied by (SD WebUI's ``Noise
    multiplier``): its ``initial_noise_multiplier``, else its ``override_settings``' option of that
    name, else 1; 1 for any other kind (SD WebUI reads it only there, not in a hires fix).
    ``Reject`` (``invalid_params``) for what is no finite number."""
    if kind is not TaskType.IMAGE_TO_IMAGE:
        return 1.0
    overrides = params.extra.get("override_settings")
    value, where = params.extra.get(MULTIPLIER), MULTIPLIER
    if value is None and isinstance(overrides, dict):
        value, where = overrides.get(MULTIPLIER), f"override_settings.{MULTIPLIER}"
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Reject(f"{where} must be a number, not {value!r}", code="invalid_params")
    return float(value)


def _side(extra: dict[str, Any], name: str) -> int:
    value = extra.get(name)
    if value is None:
        return -1
    if type(value) is not int:
        raise Reject(f"{name} must be an integer, not {value!r}", code="invalid_params")
    return value


def consecutive(first: int, images: int) -> list[int]:
    """``images`` seeds from ``first`` on, past 2**32 − 1 as SD WebUI's (a task asks for one
    below 2**32; torch takes 64 bits)."""
    return [first + i for i in range(images)]


def seeds(seed: int, images: int, variation: Variation | None) -> list[int]:
    """Each image's seed: consecutive, or all the same with a strength (SD WebUI's rule)."""
    same = variation is not None and variation.strength != 0
    return [seed] * images if same else consecutive(seed, images)


def subseeds(variation: Variation, images: int) -> list[int]:
    """Each image's variation seed: consecutive from ``variation.subseed`` (random for -1)."""
    first = variation.subseed if variation.subseed >= 0 else random.randrange(_SEEDS)
    return consecutive(first, images)


def words(variation: Variation | None, subseed: int | None) -> list[tuple[str, Any]]:
    """What an image's infotext says of its variation, in SD WebUI's words and order."""
    if variation is None:
        return []
    said: list[tuple[str, Any]] = []
    if variation.strength != 0:
        said += [("Variation seed", subseed), ("Variation seed strength", variation.strength)]
    if variation.resize_from is not None:
        said.append(("Seed resize from", "{}x{}".format(*variation.resize_from)))
    return said
