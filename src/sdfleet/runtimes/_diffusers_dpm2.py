"""SD WebUI's DPM2 and DPM2 a schedules. Imports torch and diffusers.

SD WebUI 1.10 marks both ``discard_next_to_last_sigma``: for ``n`` steps it makes the schedule of
``n + 1`` (uniform or Karras) and drops its next-to-last sigma, so the last step goes from the
``n``-th sigma of that longer schedule straight to 0 (k-diffusion ends a DPM2 step to 0 with one
Euler pass). diffusers' KDPM2 schedulers step over the schedule of ``n``. On SD WebUI's own
checkpoint (8 steps, 64²) that kept DPM2 a's images 1.6-1.8 of 255 from SD WebUI's and DPM2's
0.7; with the sigma dropped both are 0.5, as Euler's (the issue note). ``Discarding`` makes
diffusers' schedule of ``n + 1`` and builds the interleaved arrays again from its sigmas less that
one, as diffusers' ``set_timesteps`` builds them (its code, diffusers 0.42).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler


def _base(scheduler: Any) -> tuple[np.ndarray, np.ndarray]:
    """The sigmas (without the closing 0) and timesteps of the steps of ``scheduler``'s schedule,
    from its interleaved arrays: ``s0, s1, s1, …, sn, sn, 0, 0, 0`` and ``t0, t½, t1, …, tn``."""
    sigmas = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2][:-2]]).cpu().numpy()
    timesteps = scheduler.timesteps[0::2].cpu().numpy()
    return sigmas, timesteps


class _Discarding:
    """``set_timesteps`` of ``n`` steps as SD WebUI's: the schedule of ``n + 1`` less its
    next-to-last sigma, its arrays built as diffusers builds them from a schedule's sigmas (each
    step's midpoint: ``_midpoints``; the midpoints' timesteps that alternate with the steps':
    ``_between``)."""

    _between: slice

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: str | torch.device | None = None,
        num_train_timesteps: int | None = None,
    ) -> None:
        super().set_timesteps(num_inference_steps + 1, device, num_train_timesteps)  # type: ignore[misc]
        sigmas, timesteps = _base(self)
        s = torch.from_numpy(np.concatenate([sigmas[:-1], [0.0]]).astype(np.float32)).to(device=device)
        t = torch.from_numpy(timesteps[:-1]).to(device)
        interpol = self._midpoints(s)
        self.sigmas, self.sigmas_interpol = _doubled(s), _doubled(interpol)
        self.timesteps = _alternating(t, _timesteps_of(self, interpol, t.dtype, device)[self._between])
        self.sample = None
        self._step_index = None
        self._begin_index = None
        self.sigmas = self.sigmas.to("cpu")  # diffusers' own: less CPU/GPU traffic
        self.num_inference_steps = num_inference_steps

    def _midpoints(self, sigmas: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DPM2Discarding(_Discarding, KDPM2DiscreteScheduler):  # type: ignore[misc]
    """diffusers' DPM2 on SD WebUI's schedule."""

    _between = slice(1, -1)

    def _midpoints(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()


class DPM2AncestralDiscarding(_Discarding, KDPM2AncestralDiscreteScheduler):  # type: ignore[misc]
    """diffusers' DPM2 a on SD WebUI's schedule: its ancestral step's noise amounts too."""

    _between = slice(None, -2)

    def _midpoints(self, sigmas: torch.Tensor) -> torch.Tensor:
        following = sigmas.roll(-1)
        following[-1] = 0.0
        up = (following**2 * (sigmas**2 - following**2) / sigmas**2) ** 0.5
        down = (following**2 - up**2) ** 0.5
        down[-1] = 0.0
        self.sigmas_up, self.sigmas_down = _doubled(up), _doubled(down)
        interpol = sigmas.log().lerp(down.log(), 0.5).exp()
        interpol[-2:] = 0.0
        return interpol


def _doubled(values: torch.Tensor) -> torch.Tensor:
    """A step array interleaved as diffusers' second-order schedulers keep it: the first, each
    other twice (a step's two passes), the last once more."""
    return torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]])


def _alternating(timesteps: torch.Tensor, between: torch.Tensor) -> torch.Tensor:
    """The first timestep, then each step's second evaluation's and the next step's in turn."""
    return torch.cat([timesteps[:1], torch.stack((between[:, None], timesteps[1:, None]), dim=-1).flatten()])


def _timesteps_of(scheduler: Any, sigmas: torch.Tensor, dtype: torch.dtype, device: Any) -> torch.Tensor:
    log_sigmas = scheduler.log_sigmas.cpu()
    found = np.array([scheduler._sigma_to_t(sigma, log_sigmas) for sigma in sigmas.cpu()])
    return torch.from_numpy(found).to(device, dtype=dtype)
