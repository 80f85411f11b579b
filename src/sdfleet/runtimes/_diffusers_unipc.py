"""SD WebUI's UniPC. Imports torch and diffusers.

SD WebUI 1.10's UniPC is its own implementation (``uni_pc``, the UniPC authors' code) at its
options' defaults: order 3, variant bh1, the lower order at the end (diffusers' UniPC steps as it
given those: ``SAMPLERS``' config), over as many steps as its DDIM timesteps of ``steps``
(``clipped_timesteps``: 16 for 15 steps, 31 for 30), ``time_uniform`` in its continuous time ``t``
from 1 to ``1 / 1000``: the model is given ``(t - 1 / 1000) × 1000``, not rounded, and the alphas
between the model's are interpolated in log alpha. diffusers' configured so made ``steps``
timesteps rounded to integers (0.25 of 255 from SD WebUI's image at 15 steps, 0.012 at 8).

Its image-to-image (``sample_img2img``, a hires pass too) noises the input to ``timesteps[t_enc]``
of those DDIM timesteps and runs ``t_enc`` steps time-uniform from the one below: another schedule
than the tail of a whole one, which diffusers' image-to-image slices (3.7 of 255 apart at 0.6).
The pipeline tells the scheduler where it starts (``set_begin_index``) after it has taken its view
of the tail (``get_timesteps``): ``UniPCAsSDWebUI`` writes SD WebUI's schedule for the steps left
into that tail in place, and the noise level one entry above it; the call's strength is chosen so
that diffusers' slicing leaves SD WebUI's ``t_enc`` (``_diffusers_samplers.img2img_schedule``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UniPCMultistepScheduler

from sdfleet.runtimes._diffusers_samplers import UNIPC_ORDER as ORDER
from sdfleet.runtimes._diffusers_samplers import clipped_timesteps
from sdfleet.runtimes._diffusers_timesteps import runs_the_tail


def times(steps: int, start: int | None = None) -> torch.Tensor:
    """SD WebUI's ``steps + 1`` continuous times (float32, as it computes them), from 1, or from
    the model's timestep ``start`` (its image-to-image: ``start / 1000 + 1 / 1000``), to 1/1000."""
    first = torch.tensor(1.0) if start is None else torch.tensor(start) / 1000 + 1 / 1000
    return torch.linspace(float(first), 1 / 1000, steps + 1)


class UniPCAsSDWebUI(UniPCMultistepScheduler):  # type: ignore[misc]
    """diffusers' UniPC stepping over SD WebUI's times: a whole schedule from ``set_timesteps``, an
    image-to-image call's own from ``set_begin_index`` (where it starts says its ``t_enc``)."""

    _ours = False
    """On SD WebUI's times (``ORDER`` steps or more: SD WebUI refuses fewer)."""
    _t_enc: int | None = None
    """The steps of an image-to-image call written over the schedule's tail; None: a whole one."""

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        self._ours, self._t_enc = num_inference_steps >= ORDER, None
        if self._ours:  # as many steps as SD WebUI has timesteps (it runs len(timesteps))
            made = times(len(clipped_timesteps(num_inference_steps)))
            self.timesteps = _model_time(made[:-1]).to(device)
            self.sigmas = self._sigmas(made)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where the pipeline's call starts in ``timesteps`` (its image-to-image ``get_timesteps``,
        whose view of the tail from there is the call's): SD WebUI's image-to-image schedule of the
        ``t_enc`` steps left written into that tail, its noise level at ``begin_index - 1``."""
        super().set_begin_index(begin_index)
        t_enc = len(self.timesteps) - begin_index
        if not self._ours or begin_index < 1 or t_enc < ORDER or self._t_enc is not None:
            return
        first = clipped_timesteps(int(self.num_inference_steps))
        level, start = first[t_enc], first[t_enc - 1]
        made = times(t_enc, start)
        moved = torch.cat([torch.tensor([float(level)]), _model_time(made[:-1])])
        self.timesteps[begin_index - 1 :] = moved.to(self.timesteps.device)
        self.sigmas[begin_index - 1 :] = torch.cat(
            [_sigma_at(self.alphas_cumprod, level), self._sigmas(made)]
        )
        self._t_enc = t_enc

    @property
    def sd_webui_total_steps(self) -> int | None:
        """SD WebUI's ``total_steps`` of the call (skip early CFG reads it): its steps, ``t_enc + 1``
        for image-to-image; None on diffusers' timesteps."""
        if not self._ours:
            return None
        return self._t_enc + 1 if self._t_enc is not None else int(self.num_inference_steps)

    def step(self, model_output: Any, timestep: Any, sample: Any, return_dict: bool = True) -> Any:
        if self._t_enc is not None and self.step_index is None:
            runs_the_tail(self, timestep, self.timesteps[self.begin_index])
        return super().step(model_output, timestep, sample, return_dict)

    def add_noise(self, original_samples: Any, noise: Any, timesteps: Any) -> Any:
        if self._t_enc is None or self.step_index is not None:  # not the start (a re-noising)
            return super().add_noise(original_samples, noise, timesteps)
        sigma = self.sigmas[self.begin_index - 1].to(original_samples.device, original_samples.dtype)
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        return alpha_t * original_samples + sigma_t * noise

    def _sigmas(self, made: torch.Tensor) -> torch.Tensor:
        """The sigmas at SD WebUI's times ``made``: its ``NoiseScheduleVP('discrete')``, the log
        alphas of the model's timesteps at times 1/1000 … 1, interpolated between."""
        grid = torch.linspace(0.0, 1.0, len(self.alphas_cumprod) + 1)[1:]
        log_alpha = _interpolate(made, grid, 0.5 * torch.log(self.alphas_cumprod.float()))
        return torch.sqrt(torch.expm1(-2 * log_alpha))  # sigma_vp / alpha


def _model_time(made: torch.Tensor) -> torch.Tensor:
    """The model's timestep at SD WebUI's continuous times (``get_model_input_time``)."""
    return (made - 1 / 1000) * 1000


def _sigma_at(alphas_cumprod: torch.Tensor, timestep: int) -> torch.Tensor:
    alpha = alphas_cumprod[timestep : timestep + 1].float()
    return ((1 - alpha) / alpha) ** 0.5


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise linear through (``xp``, ``fp``), extended by its end segments (``interpolate_fn``)."""
    right = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[right - 1], xp[right], fp[right - 1], fp[right]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)
