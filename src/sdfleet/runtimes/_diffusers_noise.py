"""The starting noise of a text-to-image call with variation seeds (``sdfleet.variation``), made
as SD WebUI 1.10's ``ImageRNG.first`` makes it on the CPU. Imports torch.

Without a variation the pipeline draws the noise itself from each image's generator; with one, the
call is given the noise (``latents``) and the generators as this leaves them, so the noise an
ancestral sampler adds at each step comes from the same stream as in SD WebUI.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdfleet.variation import Variation


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """SD WebUI's spherical interpolation of two noises of one image (C, H, W), along dim 1, with
    its linear fallback for nearly parallel noises (whose weights it swaps; kept, to make its
    images). Two departures, where SD WebUI's noise is NaN or huge and its request fails
    (``NansException``): noises one latent row high, each of whose columns is a pair of parallel
    or opposite one-element vectors, and a column whose cosine rounds past 1, are mixed linearly."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    if low.shape[1] == 1:
        return low * (1 - val) + high * val
    omega = torch.acos(dot.clamp(-1.0, 1.0))
    so = torch.sin(omega)
    flat = so == 0
    safe = torch.where(flat, 1.0, so)
    to_low = torch.where(flat, 1.0 - val, torch.sin((1.0 - val) * omega) / safe)
    to_high = torch.where(flat, val, torch.sin(val * omega) / safe)
    return to_low.unsqueeze(1) * low + to_high.unsqueeze(1) * high


def _randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def first_noise(
    variation: Variation,
    seeds: Sequence[int],
    subseeds: Sequence[int],
    shape: tuple[int, int, int],
    scale: int,
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The noise of each image (latent ``shape``: channels, height, width; ``scale`` image pixels
    a latent pixel) as a (batch, C, H, W) float32 tensor, and each image's generator, seeded with
    its seed and past the noise drawn from it."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    channels = shape[0]
    resize = variation.resize_from
    noise_shape = shape if resize is None else (channels, resize[1] // scale, resize[0] // scale)
    noises = []
    for seed, subseed, generator in zip(seeds, subseeds, generators, strict=True):
        if noise_shape == shape:
            noise = torch.randn(shape, generator=generator)
        else:
            noise = _randn(seed, noise_shape)
        if variation.strength != 0:
            noise = slerp(variation.strength, noise, _randn(subseed, noise_shape))
        if noise_shape != shape:
            noise = _centred(noise, torch.randn(shape, generator=generator))
        noises.append(noise)
    return torch.stack(noises), generators


def _centred(noise: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """``noise`` set in the middle of ``into``, cut where it is larger (SD WebUI's arithmetic)."""
    dx = (into.shape[2] - noise.shape[2]) // 2
    dy = (into.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    dx, dy = max(-dx, 0), max(-dy, 0)
    into[:, ty : ty + h, tx : tx + w] = noise[:, dy : dy + h, dx : dx + w]
    return into
