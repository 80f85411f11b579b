"""DPM++ 2M SDE's noise as SD WebUI 1.10's (``_diffusers_sde``): k-diffusion's Brownian-tree noise
sampler, one tree an image seeded with its seed (``BatchedBrownianTree``, ``create_noise_sampler``),
written out below with ``sample_dpmpp_2m_sde``, against the scheduler driven as a diffusers
pipeline drives it, one model standing in for the UNet."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torchsde
from test_diffusers_timesteps import SD15_SCHEDULER

from sdfleet.runtimes._diffusers_pipes import make_scheduler
from sdfleet.runtimes._diffusers_sde import BrownianNoise


def eps(x: torch.Tensor, t: float) -> torch.Tensor:
    """A stand-in for the UNet's noise prediction (its input the VP latents)."""
    return 0.3 * x * (1 - t / 1000) + 0.1 * torch.sin(x + t / 100)


def their_noise(like: torch.Tensor, sigmas: torch.Tensor, seeds: list[int]) -> Any:
    """k-diffusion's ``BrownianTreeNoiseSampler`` over ``sigmas``, one tree a seed."""
    live = sigmas[sigmas > 0]
    w0 = torch.zeros_like(like)[0]
    trees = [torchsde.BrownianTree(live.min(), w0, live.max(), entropy=seed) for seed in seeds]

    def sample(sigma: torch.Tensor, following: torch.Tensor) -> torch.Tensor:
        low, high, sign = (following, sigma, -1)  # the tree rounds to 6 digits: rounded here, or a
        # query at its lowest sigma warns (the tests' warnings are errors) before it does the same
        w = torch.stack([tree(round(float(low), 6), round(float(high), 6)) for tree in trees]) * sign
        return w / (following - sigma).abs().sqrt()

    return sample


def their_dpmpp_2m_sde(
    x: torch.Tensor,
    sigmas: torch.Tensor,
    whole: torch.Tensor,
    timesteps: dict[float, float],
    seeds: list[int],
) -> torch.Tensor:
    """k-diffusion's ``sample_dpmpp_2m_sde`` (eta 1, midpoint) over ``sigmas`` with that noise over
    the ``whole`` schedule's (SD WebUI's image-to-image slices the sigmas, not the noise's), on VE
    latents."""
    noise = their_noise(x, whole, seeds)
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, following = sigmas[i], sigmas[i + 1]
        denoised = x - sigma * eps(x / (sigma**2 + 1) ** 0.5, timesteps[float(sigma)])
        if following == 0:
            x = denoised
            continue
        h = -following.log() + sigma.log()
        x = following / sigma * (-h).exp() * x + (-2 * h).expm1().neg() * denoised
        if old is not None and h_last is not None:
            x = x + 0.5 * (-2 * h).expm1().neg() * (h / h_last) * (denoised - old)
        x = x + noise(sigma, following) * following * (-2 * h).expm1().neg().sqrt()
        old, h_last = denoised, h
    return x


def ours(
    name: str, steps: int, begin: int, start: torch.Tensor, seeds: list[int]
) -> tuple[torch.Tensor, Any]:
    """The scheduler driven as a pipeline drives it from ``begin``, given one generator an image."""
    scheduler = make_scheduler(name, SD15_SCHEDULER)
    scheduler.set_timesteps(steps)
    if begin:
        scheduler.set_begin_index(begin)
    x = start / (scheduler.sigmas[begin] ** 2 + 1) ** 0.5  # VE to the pipeline's VP latents
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    for t in scheduler.timesteps[begin:]:
        x = scheduler.step(eps(x, float(t)), t, x, generator=generators).prev_sample
    return x, scheduler


@pytest.mark.parametrize("name", ["DPM++ 2M SDE", "DPM++ 2M SDE Karras"])
@pytest.mark.parametrize(("steps", "begin"), [(8, 0), (15, 0), (8, 3), (20, 9)])
def test_dpmpp_2m_sde_samples_as_sd_webuis(name: str, steps: int, begin: int) -> None:
    """From the same start, SD WebUI's sample (image-to-image: the call's sigmas from where it
    starts, its trees over the whole schedule's); diffusers' own draws made another (24 of 255
    apart)."""
    seeds = [5, 77]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler = make_scheduler(name, SD15_SCHEDULER)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas[begin:]
    timesteps = {float(s): float(t) for s, t in zip(scheduler.sigmas, scheduler.timesteps, strict=False)}
    theirs = their_dpmpp_2m_sde(noise * sigmas[0], sigmas, scheduler.sigmas, timesteps, seeds)
    mine, _ = ours(name, steps, begin, noise * sigmas[0], seeds)
    assert torch.allclose(mine, theirs, atol=1e-4 * float(theirs.abs().max()))
    own = type(scheduler).__mro__[1].from_config(scheduler.config)  # diffusers' draws
    own.set_timesteps(steps)
    x = noise * sigmas[0] / (own.sigmas[begin] ** 2 + 1) ** 0.5
    own.set_begin_index(begin)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    for t in own.timesteps[begin:]:
        x = own.step(eps(x, float(t)), t, x, generator=generators).prev_sample
    assert not torch.allclose(x, theirs, atol=1e-2)


def test_an_images_noise_is_its_own_whatever_its_batch() -> None:
    """One tree an image: an image's noise alone and beside another is the same (SD WebUI's reason
    for the seeds), and its increments add up as a Brownian motion's."""
    like = torch.zeros(2, 4, 8, 8)
    high, middle, low = torch.tensor(14.6), torch.tensor(3.0), torch.tensor(0.03)
    both = BrownianNoise(like, low, high, [5, 77])
    alone = BrownianNoise(like[:1], low, high, [5])
    assert torch.equal(both(high, middle)[0], alone(high, middle)[0])
    assert not torch.equal(both(high, middle)[0], both(high, middle)[1])
    whole = both(high, low) * (high - low).sqrt()
    parts = both(high, middle) * (high - middle).sqrt() + both(middle, low) * (middle - low).sqrt()
    assert torch.allclose(whole, parts, atol=1e-5)


def test_without_one_generator_an_image_diffusers_own_draws() -> None:
    """A pipeline call given no generators (or not one an image) draws as diffusers does."""
    made = make_scheduler("DPM++ 2M SDE Karras", SD15_SCHEDULER)
    own = type(made).__mro__[1].from_config(made.config)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    out = []
    for scheduler in (made, own):
        scheduler.set_timesteps(4)
        t = scheduler.timesteps[0]
        generator = torch.Generator().manual_seed(1)
        out.append(scheduler.step(eps(x, float(t)), t, x, generator=generator).prev_sample)
    assert torch.equal(out[0], out[1])


def their_dpmpp_sde(
    x: torch.Tensor, sigmas: torch.Tensor, whole: torch.Tensor, t_of: Any, seeds: list[int]
) -> torch.Tensor:
    """k-diffusion's ``sample_dpmpp_sde`` (eta 1, r 1/2: two evaluations a step, the second at the
    midpoint in log sigma) over ``sigmas`` with the noise over the ``whole`` schedule's, VE."""
    noise = their_noise(x, whole, seeds)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x - sigma * eps(x / (sigma**2 + 1) ** 0.5, t_of(sigma))

    def ancestral(start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        up = torch.minimum(end, (end**2 * (start**2 - end**2) / start**2) ** 0.5)
        return (end**2 - up**2) ** 0.5, up

    for i in range(len(sigmas) - 1):
        sigma, following = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if following == 0:
            x = x + (x - denoised) / sigma * (following - sigma)
            continue
        t, t_next = -sigma.log(), -following.log()
        s = t + (t_next - t) / 2
        down, up = ancestral(sigma, (-s).exp())
        x_2 = down / sigma * x - (t + down.log()).expm1() * denoised
        x_2 = x_2 + noise(sigma, (-s).exp()) * up
        denoised_2 = denoise(x_2, (-s).exp())
        down, up = ancestral(sigma, following)
        x = down / sigma * x - (t + down.log()).expm1() * denoised_2
        x = x + noise(sigma, following) * up
    return x


@pytest.mark.parametrize("name", ["DPM++ SDE", "DPM++ SDE Karras"])
@pytest.mark.parametrize(("steps", "begin"), [(8, 0), (15, 0), (8, 3)])
def test_dpmpp_sde_samples_as_sd_webuis(name: str, steps: int, begin: int) -> None:
    """DPM++ SDE (diffusers' port of k-diffusion's, which seeds one tree for a whole call) with SD
    WebUI's noise, one tree an image of its seed: SD WebUI's sample from the same start, whole or
    from the middle (a step is two evaluations: the call starts at entry ``2 × begin``)."""
    seeds = [5, 77]
    scheduler = make_scheduler(name, SD15_SCHEDULER)
    scheduler.set_timesteps(steps)
    whole = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1:-1:2], scheduler.sigmas[-1:]])
    log_sigmas = torch.log(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5).numpy()

    def t_of(sigma: torch.Tensor) -> float:
        return float(scheduler._sigma_to_t(np.array(float(sigma)), log_sigmas))

    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * whole[begin]
    theirs = their_dpmpp_sde(start, whole[begin:], whole, t_of, seeds)
    if begin:
        scheduler.set_begin_index(2 * begin)
    x = start
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    for t in scheduler.timesteps[2 * begin :]:
        given = eps(scheduler.scale_model_input(x, t), float(t))
        x = scheduler.step(given, t, x, generator=generators).prev_sample
    assert torch.allclose(x, theirs, atol=1e-4 * float(theirs.abs().max()))
