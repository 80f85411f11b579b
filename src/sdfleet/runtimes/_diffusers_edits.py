"""Prompt editing and alternation in a diffusers pipeline call (``_prompt_schedule`` reads them).
Imports torch.

The call starts with the embeddings of step 0's prompts; at the end of each step the callback
hands the pipeline those of the next step's, when they change, in the layout the pipeline made of
the first (the negative prompt's rows, then the prompt's, with CFG; SDXL's pooled embeddings
beside them). A step is a pass through the UNet, as SD WebUI's denoiser counts them: Heun and
DPM2 take two for most steps in both. Each pair of prompts is encoded once, when first needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sdfleet.runtimes import _diffusers_prompts as E
from sdfleet.runtimes import _diffusers_refiner as RF
from sdfleet.runtimes._prompt_schedule import Edits

_NEGATIVE = {"prompt_embeds": "negative_prompt_embeds", "add_text_embeds": "negative_pooled_prompt_embeds"}
"""Where ``_diffusers_prompts.call_embeds`` puts the negative prompt's rows of each."""


def tensor_inputs(pipe: Any) -> list[str]:
    """What the step callback is handed: the latents, and the embeddings it replaces."""
    return ["latents", "prompt_embeds", *(["add_text_embeds"] if E.xl(pipe) else [])]


def switching(
    inner: Callable[..., dict[str, Any]],
    edits: Edits,
    images: int,
    clip_skip: int | None,
    reading: E.Reading,
    swap: RF.Swap | None = None,
) -> Callable[..., dict[str, Any]]:
    """A step callback that runs ``inner`` (progress, interrupt), then gives the pipeline the
    next step's embeddings where ``edits`` changes the prompts (``images`` rows of each), and
    where a refiner (``swap``) takes over: its UNet and VAE, and its text encoders' embeddings."""
    made: dict[tuple[tuple[str, str], bool], dict[str, Any]] = {}

    def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        out = dict(inner(pipe, i, t, kwargs))
        now, then = edits.at(i), edits.at(i + 1)
        swapping = swap is not None and i + 1 == swap.at
        if swap is not None and swapping:
            swap.take_over(pipe)
        if now == then and not swapping:
            return out
        encoder = swap.encoder(pipe, i + 1) if swap is not None else pipe
        key = (then, encoder is not pipe)
        if key not in made:
            made[key] = _rows(encoder, pipe.do_classifier_free_guidance, then, images, clip_skip, reading)
        current = kwargs["prompt_embeds"]
        for name, value in made[key].items():
            out[name] = value.to(current.device)
        return out

    return on_step_end


def _rows(
    pipe: Any, guided: bool, texts: tuple[str, str], images: int, clip_skip: int | None, reading: E.Reading
) -> dict[str, torch.Tensor]:
    """The step's embeddings by ``pipe``'s text encoders as the pipeline holds them during its loop
    (``guided``: with CFG)."""
    prompt, negative = texts
    embeds = E.encode(pipe, prompt, negative or None, clip_skip, reading)
    call = E.call_embeds(pipe, [embeds], [images])
    rows: dict[str, torch.Tensor] = {"prompt_embeds": call["prompt_embeds"]}
    if E.xl(pipe):
        rows["add_text_embeds"] = call["pooled_prompt_embeds"]
    if guided:  # the negative prompt's rows first, as the pipeline puts them
        for name, rows_of in list(rows.items()):
            negative_rows = call[_NEGATIVE[name]]
            if negative_rows is None:  # SDXL without a negative prompt: zeros, as the pipeline makes them
                negative_rows = torch.zeros_like(rows_of)
            rows[name] = torch.cat([negative_rows, rows_of])
    return rows
