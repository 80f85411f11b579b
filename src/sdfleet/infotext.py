"""SD WebUI 1.10's infotext: the ``parameters`` text of an image, as ``create_infotext`` writes it.

One writer for the diffusers runtime's PNGs and ``runtime serve``'s answers, so that the two say
the same of the same image: the prompt, ``Negative prompt: …``, then one line of ``Key: value``
words in SD WebUI's order. A value with a comma, colon or newline is JSON-quoted, as there, and
``Version`` names sdfleet, not an SD WebUI release. SD WebUI's PNG Info reads it back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sdfleet import __version__

VERSION = f"sdfleet-{__version__}"
"""What ``Version`` says (and ``runtime serve``'s ``info.version``)."""

CORE = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Size",
    "Model hash",
    "Model",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "Tiling",
)
"""The words ``create_infotext`` always places, in its order (those sdfleet can say: no face
restoration, VAE, ENSD, RNG or user); ``extra_generation_params`` follow them."""


def quote(value: Any) -> Any:
    """An infotext value, JSON-quoted when it holds a comma, colon or newline (as SD WebUI does)."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(text, ensure_ascii=False)


def text(
    prompt: str,
    negative_prompt: str,
    core: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    version: str | None = VERSION,
) -> str:
    """An image's infotext: ``core`` words (keys of ``CORE``) in SD WebUI's order, then ``extra``
    (SD WebUI's ``extra_generation_params``: a word already placed keeps its place and takes
    this value, as a dict update does there), then ``Version``. None leaves a word out; a word
    whose value is its own key is said alone."""
    unknown = set(core) - set(CORE)
    if unknown:
        raise ValueError(f"not infotext core words: {', '.join(sorted(unknown))}")
    words = {key: core.get(key) for key in CORE} | dict(extra or {}) | {"Version": version}
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in words.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()
