"""k-diffusion's churn for Euler (SD WebUI's ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``).
Imports torch and diffusers.

SD WebUI's Euler (k-diffusion's ``sample_euler``, Karras et al. 2022, algorithm 2) raises each
step's sigma by ``gamma = min(s_churn / steps, sqrt(2) - 1)`` where ``s_tmin <= sigma <= s_tmax``,
adds noise to match (``s_noise`` times a fresh draw, taken at every step), and denoises *at the
raised sigma*. diffusers' Euler adds its churn after the model has seen the step's latents, which
is another sampler. ``EulerChurn`` is k-diffusion's: its timesteps are the raised sigmas' (the
UNet is called there), ``scale_model_input`` adds the noise before the call (drawn from the call's
generators, one image each, as SD WebUI draws it from each image's), and ``step`` goes on from the
noised latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from sdfleet.tasks import TaskParams

_GAMMA_MAX = 2**0.5 - 1


@dataclass(frozen=True)
class Churn:
    """SD WebUI's ``s_churn``, ``s_tmin``, ``s_tmax`` (0: no bound, as there) and ``s_noise``."""

    churn: float = 0.0
    tmin: float = 0.0
    tmax: float = math.inf
    noise: float = 1.0


def read(p: TaskParams) -> Churn | None:
    """A task's churn (numbers: the API's bounds); None without one (``s_churn`` 0 or none)."""
    churn = p.extra.get("s_churn")
    if not isinstance(churn, int | float) or churn == 0:
        return None

    def number(name: str, default: float) -> float:
        value = p.extra.get(name)
        return float(value) if isinstance(value, int | float) else default

    tmax = number("s_tmax", 0.0) or math.inf  # 0: no bound (SD WebUI's)
    return Churn(float(churn), number("s_tmin", 0.0), tmax, number("s_noise", 1.0))


class EulerChurn(EulerDiscreteScheduler):  # type: ignore[misc]
    """diffusers' Euler with k-diffusion's churn (set ``churn``; ``ready`` before each call)."""

    churn: Churn = Churn()
    steps_run: int | None = None
    generators: Any = None
    sigma_hats: torch.Tensor | None = None
    _raised: torch.Tensor | None = None

    def set_timesteps(self, num_inference_steps: int, device: Any = None, **kwargs: Any) -> None:
        super().set_timesteps(num_inference_steps, device=device, **kwargs)
        run = self.steps_run or num_inference_steps  # k-diffusion divides by the steps it runs
        gamma = min(self.churn.churn / run, _GAMMA_MAX)
        sigmas = self.sigmas[:-1].double().tolist()
        raised = [s * (1 + gamma) if self.churn.tmin <= s <= self.churn.tmax else s for s in sigmas]
        self.sigma_hats = torch.tensor(raised, dtype=torch.float32)
        log_sigmas = np.log(((1 - self.alphas_cumprod) / self.alphas_cumprod).numpy() ** 0.5)
        moved = [i for i, (s, h) in enumerate(zip(sigmas, raised, strict=True)) if h != s]
        if moved:  # the UNet is called at the raised sigma's timestep
            at = np.atleast_1d(self._sigma_to_t(np.array([raised[i] for i in moved]), log_sigmas))
            timesteps: torch.Tensor = self.timesteps.clone()  # type: ignore[has-type]  # set by diffusers
            timesteps[moved] = torch.as_tensor(at, dtype=timesteps.dtype, device=timesteps.device)
            self.timesteps = timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        if self.step_index is None:
            self._init_step_index(timestep)
        assert self.sigma_hats is not None and self.generators is not None
        sigma, hat = float(self.sigmas[self.step_index]), float(self.sigma_hats[self.step_index])
        images = len(self.generators)
        latents = sample[:images]  # with CFG the pipeline hands the latents twice
        shape, device, dtype = latents.shape, latents.device, latents.dtype
        eps = randn_tensor(shape, generator=self.generators, device=device, dtype=dtype)
        if hat > sigma:
            latents = latents + eps * self.churn.noise * (hat**2 - sigma**2) ** 0.5
        self._raised = latents
        self.is_scale_input_called = True
        scaled: torch.Tensor = torch.cat([latents] * (sample.shape[0] // images)) / (hat**2 + 1) ** 0.5
        return scaled

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: Any = None,
        return_dict: bool = True,
        **_: Any,
    ) -> Any:
        assert self.sigma_hats is not None and self._raised is not None
        hat = float(self.sigma_hats[self.step_index])
        latents = self._raised.to(torch.float32)
        if self.config.prediction_type == "v_prediction":
            denoised = model_output * (-hat / (hat**2 + 1) ** 0.5) + latents / (hat**2 + 1)
        else:  # epsilon (diffusers' step refuses the others)
            denoised = latents - hat * model_output
        after = float(self.sigmas[self.step_index + 1])
        prev = (latents + (latents - denoised) / hat * (after - hat)).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev, denoised)
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)


def with_churn(scheduler: Any, churn: Churn | None) -> Any:
    """``scheduler`` with ``churn`` (an ``EulerChurn`` of its config) where it is diffusers' Euler;
    else ``scheduler`` as it is (the API refuses churn for the samplers that take one but Euler)."""
    if churn is None or type(scheduler) is not EulerDiscreteScheduler:
        return scheduler
    made = EulerChurn.from_config(scheduler.config)
    made.churn = churn
    return made


def ready(scheduler: Any, call: dict[str, Any], steps: int) -> None:
    """Hands an ``EulerChurn`` a pipeline call's generators (``call``) and the steps it runs of
    ``steps`` (image-to-image: the last ``strength`` of them, as diffusers' ``get_timesteps``)."""
    if not isinstance(scheduler, EulerChurn):
        return
    strength = call.get("strength")
    scheduler.generators = call["generator"]
    scheduler.steps_run = min(int(steps * strength), steps) if strength is not None else steps
