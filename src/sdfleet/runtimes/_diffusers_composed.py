"""SD WebUI's composable diffusion (``a cat AND a dog :0.5``) in a diffusers pipeline call. Imports
torch.

SD WebUI denoises each part of the prompt (``_prompt_schedule.parts``) and the negative prompt,
and combines them as ``uncond + cfg × Σ weight × (part − uncond)``. A pipeline call makes one
prediction of the prompt's: ``ComposedUNet`` stands in for the UNet during the call, runs the
parts itself and hands the pipeline ``uncond + Σ weight × (part − uncond)`` as that prediction,
which its CFG turns into SD WebUI's sum. The parts (and the negative prompt) are read at each
pass through the UNet by the pass's texts of their schedules, so prompt editing works in each.
The pipeline is given placeholder embeddings it never passes on. A job of several parts runs
alone (``batch_key``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from sdfleet import hires
from sdfleet.runtimes import _diffusers_prompts as E
from sdfleet.runtimes import _prompt_schedule as PS
from sdfleet.runtimes._diffusers_lora import text
from sdfleet.runtimes._diffusers_passes import clip_skip, second_texts
from sdfleet.runtimes._diffusers_samplers import sampler_key, total_steps
from sdfleet.runtimes._instead import instead
from sdfleet.tasks import TaskParams


def asked(params: TaskParams) -> bool:
    """Whether a task's prompt is several (``AND``)."""
    return PS.composable(text(params.prompt))


class ComposedUNet:
    """The UNet of a call whose prompt is several parts (``parts``: each one's schedule and
    weight; ``negative``: the negative prompt's schedule), for ``images`` images with CFG. Its
    ``n``-th call is the call's ``n``-th pass through the UNet."""

    def __init__(
        self,
        unet: Any,
        pipe: Any,
        parts: list[tuple[list[tuple[int, str]], float]],
        negative: list[tuple[int, str]],
        images: int,
        clip_skip: int | None,
        reading: E.Reading,
    ) -> None:
        self.unet, self.pipe, self.parts, self.negative = unet, pipe, parts, negative
        self.images, self.clip_skip, self.reading = images, clip_skip, reading
        self.passes = 0
        self._rest: dict[str, Any] = {}
        self._made: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unet, name)

    def _encoded(self, words: str, negative: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (words, negative) not in self._made:
            if negative and not words and E.xl(self.pipe) and self.pipe.config.force_zeros_for_empty_prompt:
                z, pooled = E.encode_text(self.pipe, "", None, self.reading)  # zeros: SD WebUI's too
                made = (torch.zeros_like(z), None if pooled is None else torch.zeros_like(pooled))
            else:  # the negative prompt with clip skip too, as E.encode reads it
                made = E.encode_text(self.pipe, words, self.clip_skip, self.reading)
            self._made[(words, negative)] = made
        return self._made[(words, negative)]

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        step, self.passes = self.passes, self.passes + 1
        b = self.images
        if sample.shape[0] != 2 * b:  # no CFG rows: CFG scale 1 or less, refused before the run
            raise RuntimeError("composable diffusion needs the call's CFG rows")
        added = kwargs.pop("added_cond_kwargs", None)
        kwargs.pop("encoder_hidden_states", None)
        kwargs.pop("return_dict", None)
        self._rest = kwargs  # timestep_cond, cross_attention_kwargs: the call's, as they were
        times = timestep if isinstance(timestep, torch.Tensor) and timestep.ndim else None
        # the negative prompt's rows, alone: SD WebUI runs them apart from conds of another length
        z, pooled = self._encoded(PS.at(self.negative, step), True)
        uncond = self._run(sample[:b], times[:b] if times is not None else timestep, z, pooled, added, 0, 1)
        # each image's parts, image by image, padded to the longest as SD WebUI's stack_conds pads
        made = [self._encoded(PS.at(schedule, step), False) for schedule, _ in self.parts]
        longest = max(z.shape[1] for z, _ in made)
        conds = torch.cat([_padded(z, longest) for z, _ in made])
        pools = torch.cat([p for _, p in made if p is not None]) if made[0][1] is not None else None
        n = len(self.parts)
        rows = sample[b:].repeat_interleave(n, dim=0)
        at = times[b:].repeat_interleave(n) if times is not None else timestep
        each = self._run(
            rows, at, conds.repeat(b, 1, 1), None if pools is None else pools.repeat(b, 1), added, 1, n
        )
        each = each.view(b, n, *each.shape[1:])
        weights = torch.tensor([w for _, w in self.parts], dtype=each.dtype, device=each.device)
        combined = uncond + ((each - uncond[:, None]) * weights.view(1, n, *[1] * (each.ndim - 2))).sum(1)
        return (torch.cat([uncond, combined]),)

    def _run(
        self,
        sample: torch.Tensor,
        timestep: Any,
        z: torch.Tensor,
        pooled: torch.Tensor | None,
        added: dict[str, Any] | None,
        half: int,
        repeats: int,
    ) -> torch.Tensor:
        """The UNet on ``sample`` with embeddings ``z`` (one row each, else repeated), SDXL's
        ``added`` conditioning of the call's ``half`` (0: the negative prompt's rows) with
        ``pooled`` for its text."""
        z = z.to(sample.dtype).expand(sample.shape[0], -1, -1) if z.shape[0] == 1 else z.to(sample.dtype)
        extra: dict[str, Any] = {}
        if added is not None:
            ids = added["time_ids"][half * self.images : (half + 1) * self.images].repeat_interleave(
                repeats, dim=0
            )
            text_embeds = pooled.to(sample.dtype) if pooled is not None else None
            if text_embeds is not None and text_embeds.shape[0] == 1:
                text_embeds = text_embeds.expand(sample.shape[0], -1)
            extra["added_cond_kwargs"] = {**added, "time_ids": ids, "text_embeds": text_embeds}
        extra = {**self._rest, **extra}
        out: tuple[torch.Tensor, ...] = self.unet(
            sample, timestep, encoder_hidden_states=z, return_dict=False, **extra
        )
        return out[0]


def _padded(z: torch.Tensor, tokens: int) -> torch.Tensor:
    """``z`` made ``tokens`` long with its last vector repeated (SD WebUI's ``stack_conds``)."""
    missing = tokens - z.shape[1]
    return torch.cat([z, z[:, -1:].repeat(1, missing, 1)], dim=1) if missing > 0 else z


@dataclass(frozen=True)
class Pass:
    """What a pass's parts are read from: its prompts (extra-network tags taken out), scheduled
    over ``steps`` (``first``: a hires fix's second pass, after the first's), and clip skip."""

    prompt: str
    negative: str
    steps: int
    first: int | None
    clip_skip: int | None


def first_pass(params: TaskParams) -> Pass:
    steps = total_steps(sampler_key(params.sampler, params.extra.get("scheduler")), params.steps)
    return Pass(text(params.prompt), text(params.negative_prompt), steps, None, clip_skip(params))


def second_pass(params: TaskParams, plan: hires.Hires) -> Pass:
    """A hires fix's second pass: its own prompts or the first's, scheduled as SD WebUI does."""
    prompt, negative, steps, first = second_texts(params, plan)
    return Pass(prompt, negative, steps, first, clip_skip(params))


@contextmanager
def composing(
    pipe: Any, read: Pass, images: int, kwargs: dict[str, Any], reading: E.Reading
) -> Iterator[None]:
    """For a pass whose prompt is several parts (``read``), ``ComposedUNet`` in ``pipe`` for the
    call, and its prompt arguments (``kwargs``, changed in place) placeholders; nothing for
    another."""
    if not PS.composable(read.prompt):
        yield
        return
    negative = PS.schedule(read.negative, read.steps, read.first)
    parts = PS.parts(read.prompt, read.steps, read.first)
    composed = ComposedUNet(pipe.unet, pipe, parts, negative, images, read.clip_skip, reading)
    z, pooled = E.encode_text(pipe, "", None, reading)  # never read: the UNet reads the parts
    for name in ("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds"):
        kwargs.pop(name, None)
    kwargs |= {"prompt_embeds": z.repeat(images, 1, 1), "negative_prompt_embeds": z.repeat(images, 1, 1)}
    if pooled is not None:
        pools = pooled.repeat(images, 1)
        kwargs |= {"pooled_prompt_embeds": pools, "negative_pooled_prompt_embeds": pools}
    with instead(pipe, "unet", composed):
        yield
