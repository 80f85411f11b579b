"""SD WebUI's DDIM and PLMS schedules. Imports torch and diffusers.

SD WebUI 1.10 runs DDIM and PLMS (``sd_samplers_timesteps``) over ``sd_webui_timesteps``: from 1
every ``1000 // n`` for ``n`` steps, as many as lie below 1000, evaluating the model at each but
the first and ending at timestep 1. diffusers' (the ``leading`` spacing with SD's offset of 1)
makes ``n`` timesteps from 1, evaluates at each and ends at 0. The two agree where ``1000 // n``
divides 1000 (8, 20 steps: 0.02 of 255 apart on SD WebUI's own checkpoint) and part where it does
not: 15 steps there run 16 evaluations from 991, here 15 from 925 (5.2 of 255 apart; 30 steps 2.5).

Its image-to-image (and hires pass) noises the input to ``timesteps[t_enc]`` and evaluates from
the one below (``sample_img2img``), where diffusers noises to its first evaluation's timestep:
both noise one timestep above the call's first (the pipeline says where it starts with
``set_begin_index``; ``_diffusers_samplers.timestep_start`` gives the strength that starts it
where SD WebUI's does). PLMS's first step is two evaluations, which diffusers takes by giving its
second timestep twice: ``PLMSAsSDWebUI`` writes that arrangement of the call's timesteps into the
tail the pipeline runs (its view, taken before it says where it starts), as it is for a whole
schedule. Where diffusers' step cannot follow SD WebUI's timesteps (``sd_webui_timesteps`` None:
1, 2, 3, 9 steps, ...) both keep diffusers'.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from sdfleet.runtimes._diffusers_samplers import sd_webui_timesteps


class DDIMAsSDWebUI(DDIMScheduler):  # type: ignore[misc]
    """diffusers' DDIM stepping over SD WebUI's timesteps (its step goes ``1000 // n`` down, to
    timestep 1 from the last), noising an image-to-image call's input one timestep above its first."""

    _begin: int | None = None
    _ours = False
    """On SD WebUI's timesteps (not where ``sd_webui_timesteps`` is None)."""

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        self._begin = None
        ours = sd_webui_timesteps(num_inference_steps)
        self._ours = ours is not None
        if ours is not None:
            self.timesteps = torch.tensor(ours[:0:-1], dtype=torch.int64, device=device)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where the pipeline's call starts in ``timesteps`` (its image-to-image ``get_timesteps``)."""
        self._begin = begin_index

    @property
    def sd_webui_total_steps(self) -> int | None:
        """SD WebUI's ``total_steps`` of the call (skip early CFG reads it): its steps from the
        start, ``t_enc + 1`` from the middle (two more than it evaluates); None on diffusers'
        timesteps."""
        if not self._ours:
            return None
        return len(self.timesteps) - self._begin + 2 if self._begin else int(self.num_inference_steps)

    def add_noise(self, original_samples: Any, noise: Any, timesteps: Any) -> Any:
        begin = self._begin
        if self._ours and begin and bool((timesteps == self.timesteps[begin]).all()):  # not a re-noising
            timesteps = torch.full_like(timesteps, int(self.timesteps[begin - 1]))
        return super().add_noise(original_samples, noise, timesteps)


class PLMSAsSDWebUI(PNDMScheduler):  # type: ignore[misc]
    """diffusers' PLMS (PNDM without its Runge-Kutta steps) stepping over SD WebUI's timesteps; an
    image-to-image call's from where the pipeline says it starts (``set_begin_index``)."""

    sd_webui_total_steps: int | None = None
    """SD WebUI's ``total_steps`` of the call: its steps (diffusers' list has one more, its second
    timestep twice), ``t_enc + 1`` from the middle; None on diffusers' timesteps."""
    _level: int | None = None
    """Image-to-image: the timestep SD WebUI noises its input to."""
    _begin = 0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        self.sd_webui_total_steps, self._level = None, None
        timesteps = sd_webui_timesteps(num_inference_steps)
        if not self.config.skip_prk_steps or timesteps is None:
            return
        self.sd_webui_total_steps = num_inference_steps
        self._timesteps = np.array(timesteps[1:], dtype=np.int64)
        self.plms_timesteps = _arranged(timesteps, len(timesteps))
        self.timesteps = torch.from_numpy(self.plms_timesteps).to(device)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where the pipeline's call starts in ``timesteps`` (its image-to-image ``get_timesteps``,
        whose view of the tail from there is the call's): SD WebUI's ``t_enc`` evaluations written
        into that tail, its first step's two among them; its input noised one timestep above."""
        t_enc = len(self.timesteps) - begin_index
        timesteps = sd_webui_timesteps(int(self.num_inference_steps))
        if self.sd_webui_total_steps is None or timesteps is None or begin_index < 1 or t_enc < 2:
            return
        arranged = torch.from_numpy(_arranged(timesteps, t_enc))
        self.timesteps[begin_index:] = arranged.to(self.timesteps.device)
        self._begin, self._level, self.sd_webui_total_steps = begin_index, timesteps[t_enc], t_enc + 1

    def step(self, model_output: Any, timestep: Any, sample: Any, return_dict: bool = True) -> Any:
        if self._level is not None and self.counter == 0:
            runs_the_tail(self, timestep, self.timesteps[self._begin])
        return super().step(model_output, timestep, sample, return_dict)

    def add_noise(self, original_samples: Any, noise: Any, timesteps: Any) -> Any:
        begin = self._begin
        if self._level is not None and self.counter == 0 and bool((timesteps == self.timesteps[begin]).all()):
            timesteps = torch.full_like(timesteps, self._level)  # the start, not a re-noising
        return super().add_noise(original_samples, noise, timesteps)


def runs_the_tail(scheduler: Any, timestep: Any, written: Any) -> None:
    """At a call's first step, that the pipeline runs the tail ``scheduler`` wrote its schedule
    into (it takes a view of it before it says where it starts): ``RuntimeError`` where it copied
    the tail first, and would give the model other timesteps than the scheduler steps over."""
    given = float(timestep.flatten()[0] if isinstance(timestep, torch.Tensor) else timestep)
    if given != float(written):
        raise RuntimeError(f"the pipeline's timesteps are not {type(scheduler).__name__}'s: it copied them")


def _arranged(timesteps: list[int], t_enc: int) -> np.ndarray:
    """SD WebUI's PLMS evaluations over ``timesteps[:t_enc]`` in diffusers' arrangement: from the
    top, its first step's second evaluation at the next one down, then each again from there to
    the second (diffusers' PLMS steps its first step's second evaluation back up: ``counter`` 1)."""
    top, down = timesteps[t_enc - 1], timesteps[t_enc - 2 : 0 : -1]
    return np.array([top, timesteps[t_enc - 2], *down], dtype=np.int64)
