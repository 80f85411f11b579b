"""SD WebUI's refiner in a diffusers pipeline call (``sdfleet.refiner`` reads what a task asks for).
Imports torch.

Before the call, the pass through the UNet from which the refiner denoises is found from the
scheduler's own schedule (``switch_step``: the passes an image-to-image call skips left out). From
there the pipeline's UNet and VAE are the refiner's (``Swap``: the step callback hands them over
at the end of the pass before, ``_diffusers_edits.switching``, which also gives the pipeline the
refiner's embeddings of the prompts), and they are given back after the call. SDXL's refiner
on an SDXL model's call is given the time ids SD WebUI conditions it with (``AestheticUNet``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sdfleet import refiner
from sdfleet.runtimes._diffusers_samplers import by_timestep, total_of

_TAKEN = ("unet", "vae")
AESTHETIC_SCORES = (2.5, 6.0)
"""SD WebUI's ``sdxl_refiner_low_aesthetic_score`` (the negative prompt's) and
``sdxl_refiner_high_aesthetic_score`` (the prompt's): SDXL's refiner's last time id."""


@dataclass
class Swap:
    """The refiner's part of a pipeline call: from the UNet pass ``at`` on, its UNet and VAE
    (``models``: the refiner's pipeline) run and its text encoders read the prompts (``guided``:
    the call's rows are the negative prompt's, then the prompt's)."""

    at: int
    models: Any
    guided: bool = True
    _kept: dict[str, Any] = field(default_factory=dict)

    def take_over(self, pipe: Any) -> None:
        if not self._kept:
            self._kept = {name: getattr(pipe, name) for name in _TAKEN}
            unet = self.models.unet
            if time_ids(self.models) == 5 and time_ids(pipe) == 6:  # SDXL's refiner on an SDXL call
                unet = AestheticUNet(unet, pipe.unet, self.guided)
            pipe.unet, pipe.vae = unet, self.models.vae

    def give_back(self, pipe: Any) -> None:
        for name, module in self._kept.items():
            setattr(pipe, name, module)
        self._kept = {}

    def encoder(self, pipe: Any, step: int) -> Any:
        """The pipeline whose text encoders read the prompts of UNet pass ``step``."""
        return self.models if step >= self.at else pipe


def switch_step(
    scheduler: Any, steps: int, strength: float | None, switch_at: float | None, by_steps: bool = False
) -> int | None:
    """The UNet pass of a call of ``steps`` (image-to-image: at ``strength``) from which the
    refiner denoises, counted as the pipeline's loop counts them; None where the sampling ends
    before the ratio reaches ``switch_at``. ``by_steps`` (SD WebUI's
    ``refiner_switch_by_sample_steps``): the ratio is the passes made over SD WebUI's
    ``total_steps`` of the call, its steps (twice for a second-order sampler). Sets
    ``scheduler``'s timesteps (the call sets the same again)."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    start = 0
    if strength is not None:  # diffusers' img2img get_timesteps: the passes it skips
        start = max(steps - min(int(steps * strength), steps), 0) * scheduler.order
        if start and hasattr(scheduler, "set_begin_index"):  # as get_timesteps tells it (UniPC's
            scheduler.set_begin_index(start)  # schedule from there; DDIM's total of t_enc + 1)
    if by_steps:  # Heun makes 2n - 1 passes for n steps, SD WebUI counts 2n
        passes = len(timesteps) - start
        total = total_of(scheduler, passes)
        return next((k for k in range(passes) if refiner.reached(k / total, switch_at)), None)
    timestep_read = by_timestep(scheduler)
    trained = None if timestep_read else _training_sigmas(scheduler)
    for n in range(start, len(timesteps)):
        if timestep_read or trained is None:
            index = float(int(timesteps[n]))
        else:
            index = float(torch.argmin((trained - float(scheduler.sigmas[n])).abs()))
        if refiner.reached(refiner.completed(index), switch_at):
            return n - start
    return None


def _training_sigmas(scheduler: Any) -> torch.Tensor | None:
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        return None
    sigmas: torch.Tensor = ((1 - alphas) / alphas) ** 0.5
    return sigmas


class AestheticUNet:
    """SDXL's refiner's UNet in an SDXL model's pipeline call, as SD WebUI conditions it: the call
    makes SDXL's six time ids (original size, crop, target size), the refiner takes five, the
    last its aesthetic score (``AESTHETIC_SCORES``: the negative prompt's rows first where
    ``guided``). All else is the refiner's UNet's, but the ``add_embedding`` the call checks its
    six ids against: the model's (``checked``)."""

    def __init__(self, unet: Any, checked: Any, guided: bool) -> None:
        self.unet, self.add_embedding, self.guided = unet, checked.add_embedding, guided

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unet, name)

    def __call__(self, *args: Any, added_cond_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if added_cond_kwargs is not None:
            ids = added_cond_kwargs["time_ids"]
            low, high = AESTHETIC_SCORES
            score = torch.full((ids.shape[0], 1), high, dtype=ids.dtype, device=ids.device)
            if self.guided:
                score[: ids.shape[0] // 2] = low
            added_cond_kwargs = {**added_cond_kwargs, "time_ids": torch.cat([ids[:, :4], score], dim=1)}
        return self.unet(*args, added_cond_kwargs=added_cond_kwargs, **kwargs)


def time_ids(pipe: Any) -> int | None:
    """How many time ids ``pipe``'s UNet takes beside the pooled text (SDXL 6, its refiner 5);
    None for a UNet without them."""
    config = pipe.unet.config
    encoder = getattr(pipe, "text_encoder_2", None)
    if config.get("addition_embed_type") != "text_time" or encoder is None:
        return None
    pooled = int(encoder.config.projection_dim)
    return (int(config["projection_class_embeddings_input_dim"]) - pooled) // int(
        config["addition_time_embed_dim"]
    )


def compatible(first: Any, second: Any) -> str | None:
    """Why ``second``'s UNet cannot take over ``first``'s pipeline call, or None (``unlike``);
    SDXL's refiner takes over from SDXL (``AestheticUNet``)."""
    a, b = first.unet.config, second.unet.config
    if time_ids(first) == 6 and time_ids(second) == 5 and a.get("in_channels") == b.get("in_channels"):
        return None
    if time_ids(second) == 5:
        return "it is SDXL's refiner, which refines SDXL models"
    return unlike(a, b)


def unlike(a: Mapping[str, Any], b: Mapping[str, Any], *, loaded: bool = True) -> str | None:
    """Why a UNet of config ``b`` cannot take over from one of config ``a``, or None: SD WebUI
    swaps the weights into one model, so the refiner must be of the same shape where it matters
    (its latents, its text embeddings, SDXL's extra conditioning). Not yet ``loaded`` (``b`` read
    from its files), two SDXL-conditioned UNets pass: SDXL's refiner's is of other widths, which
    ``compatible`` tells apart once its text encoder is known."""
    xl = a.get("addition_embed_type") == b.get("addition_embed_type") == "text_time"
    if not loaded and xl and a.get("in_channels") == b.get("in_channels"):
        return None
    for key in (
        "in_channels",
        "cross_attention_dim",
        "addition_embed_type",
        "projection_class_embeddings_input_dim",
    ):
        if a.get(key) != b.get(key):
            return f"its UNet's {key} is {b.get(key)!r}, the model's {a.get(key)!r}"
    return None
