"""SD WebUI's SDE samplers' noise (DPM++ 2M SDE, DPM++ SDE). Imports torch, diffusers, torchsde.

SD WebUI 1.10 runs its SDE samplers (``brownian_noise``) with k-diffusion's
``BrownianTreeNoiseSampler``: each image's noise between two sigmas is the increment of a Brownian
motion over the sigmas (``torchsde.BrownianTree`` from the schedule's lowest sigma above 0 to its
highest, seeded with the image's seed: ``create_noise_sampler``), divided by the root of their
distance, so that an image's noise is its own whatever its batch. diffusers' DPM++ 2M SDE draws
fresh noise from the call's generators at each step (with Karras 28 of 255 from SD WebUI's
image, 0.065 with this noise). ``DPMSolverSDEAsSDWebUI`` hands diffusers' step SD WebUI's
noise (its ``variance_noise``), from trees made at the call's first step over its whole
schedule's sigmas (image-to-image too: SD WebUI makes its sampler from the sigmas before it
slices them, ``sample_img2img``), the seeds those of the generators the pipeline hands every step
(one an image, seeded with its seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torchsde
from diffusers import DPMSolverMultistepScheduler, DPMSolverSDEScheduler

_DIGITS = -int(math.log10(1e-6))
"""The digits ``torchsde.BrownianTree`` rounds its times to (its default ``tol``, 1e-6)."""


class BrownianNoise:
    """k-diffusion's ``BrownianTreeNoiseSampler`` given one seed an image (``BatchedBrownianTree``):
    each image's tree over ``[sigma_min, sigma_max]`` from zeros of one image's shape."""

    def __init__(
        self, like: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor, seeds: Sequence[int]
    ) -> None:
        w0 = torch.zeros_like(like)[0]
        self.trees = [torchsde.BrownianTree(sigma_min, w0, sigma_max, entropy=seed) for seed in seeds]

    @classmethod
    def of_call(cls, sample: torch.Tensor, sigmas: torch.Tensor, generator: Any) -> BrownianNoise | None:
        """A call's noise over its whole schedule's ``sigmas`` (SD WebUI's image-to-image too: its
        sampler is made before the sigmas are sliced), one tree an image of ``sample`` seeded with
        its generator's seed; None where the pipeline hands its step no generator an image."""
        if not isinstance(generator, list) or len(generator) != sample.shape[0]:
            return None
        live = sigmas[sigmas > 0]
        return cls(sample, live.min(), live.max(), [g.initial_seed() for g in generator])

    def __call__(self, sigma: torch.Tensor, following: torch.Tensor) -> torch.Tensor:
        low, high, sign = (sigma, following, 1) if sigma < following else (following, sigma, -1)
        # the tree rounds its times to its tolerance (1e-6), its ends first: the query rounded so
        # too, or the lowest sigma may lie below its rounded start (a warning, then the same value)
        ends = round(float(low), _DIGITS), round(float(high), _DIGITS)
        w = torch.stack([tree(*ends) for tree in self.trees]) * sign
        return w / (following - sigma).abs().sqrt()


class DPMSolverSDEAsSDWebUI(DPMSolverMultistepScheduler):  # type: ignore[misc]
    """diffusers' DPM++ 2M SDE with SD WebUI's Brownian-tree noise, where the pipeline hands its step
    one generator an image (else diffusers' own draws)."""

    _noise: BrownianNoise | None = None

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        self._noise = None

    def step(
        self,
        model_output: Any,
        timestep: Any,
        sample: Any,
        generator: Any = None,
        variance_noise: Any = None,
        return_dict: bool = True,
    ) -> Any:
        if variance_noise is None and self.config.algorithm_type == "sde-dpmsolver++" and self._noise is None:
            self._noise = BrownianNoise.of_call(sample, self.sigmas, generator)  # the call's first step
        if variance_noise is None and self._noise is not None:
            if self.step_index is None:
                self._init_step_index(timestep)
            sigma, following = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
            # the last step to sigma 0 takes no noise (k-diffusion's denoising step)
            variance_noise = self._noise(sigma, following) if following > 0 else torch.zeros_like(sample)
        return super().step(model_output, timestep, sample, generator, variance_noise, return_dict)


class DPMSolverSDEWithSeeds(DPMSolverSDEScheduler):  # type: ignore[misc]
    """diffusers' DPM++ SDE (k-diffusion's ``sample_dpmpp_sde``, which brings its own Brownian
    tree, one seed for a whole call) with SD WebUI's noise: one tree an image of its seed. Its
    ``step`` takes the pipeline's generators (the pipeline hands them to a step that names
    ``generator``), one an image; else diffusers' own tree."""

    def step(
        self,
        model_output: Any,
        timestep: Any,
        sample: Any,
        return_dict: bool = True,
        s_noise: float = 1.0,
        generator: Any = None,
    ) -> Any:
        if self.noise_sampler is None:  # type: ignore[has-type]  # set by diffusers
            self.noise_sampler = BrownianNoise.of_call(sample, self.sigmas, generator)
        return super().step(model_output, timestep, sample, return_dict, s_noise)
