"""An ancestral sampler's ``eta`` (SD WebUI's ``eta``, else its ``eta_ancestral`` option: 1). Imports
torch and diffusers.

k-diffusion's ancestral step (``get_ancestral_step``) goes down to ``sigma_down`` along the ODE and
adds fresh noise of ``sigma_up``, ``eta`` scaling the noise's share: ``sigma_up = min(sigma_to, eta
* sqrt(sigma_to² (sigma_from² - sigma_to²) / sigma_from²))``, ``sigma_down = sqrt(sigma_to² -
sigma_up²)``. diffusers' Euler a is that step at ``eta`` 1; ``EulerAncestralEta`` is it at any
``eta`` (0: plain Euler, no noise), drawing its noise as diffusers' does (one draw a step, from the
call's generators), so that at 1 it is diffusers' own. (SD WebUI 1.10 hands its Euler a no
``s_noise``: it ignores one, and so does this.)
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


class EulerAncestralEta(EulerAncestralDiscreteScheduler):  # type: ignore[misc]
    """diffusers' Euler a with k-diffusion's ``eta``."""

    eta: float = 1.0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> Any:
        if self.eta == 1.0:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, to = float(self.sigmas[self.step_index]), float(self.sigmas[self.step_index + 1])
        sample = sample.to(torch.float32)  # as diffusers' step: upcast, then back
        if self.config.prediction_type == "v_prediction":
            denoised = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        else:  # epsilon (diffusers' step refuses the others)
            denoised = sample - sigma * model_output
        up = min(to, self.eta * (to**2 * (sigma**2 - to**2) / sigma**2) ** 0.5)
        down = (to**2 - up**2) ** 0.5
        prev = sample + (sample - denoised) / sigma * (down - sigma)
        shape, dtype, device = model_output.shape, model_output.dtype, model_output.device
        noise = randn_tensor(shape, dtype=dtype, device=device, generator=generator)
        prev = (prev + noise * up).to(dtype)
        self._step_index += 1
        if not return_dict:
            return (prev, denoised)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)


def with_eta(scheduler: Any, eta: float | None) -> Any:
    """``scheduler`` at ``eta`` (an ``EulerAncestralEta`` of its config) where it is diffusers'
    Euler a and ``eta`` is not its 1; else ``scheduler`` as it is."""
    if eta is None or eta == 1 or type(scheduler) is not EulerAncestralDiscreteScheduler:
        return scheduler
    made = EulerAncestralEta.from_config(scheduler.config)
    made.eta = float(eta)
    return made
