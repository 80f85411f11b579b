"""The starting noise of a call with variation seeds (``sdfleet.variation``), made as SD WebUI
1.10's ``ImageRNG.first`` makes it on the CPU, and an image-to-image call's noise multiplier.
Imports torch.

Without either the pipeline draws the noise itself from each image's generator, first, as SD
WebUI's ``ImageRNG`` does: a diffusers pipeline also samples its VAE's encoding of an input with
that generator, before the noise, which then was the generator's second draw; its encodings
sample from a generator of their own now (``own_vae_draws``; SD WebUI samples them from torch's
global generator). A text-to-image call with a variation is given the noise (``latents``) and the
generators as this leaves them, so the noise an ancestral sampler adds at each step comes from the
same stream as in SD WebUI. An image-to-image call (a hires fix's second pass too) still draws its
noise, which moves each generator on as SD WebUI's draw does, and its scheduler's ``add_noise`` is
handed this one in its place (``given_noise``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from sdfleet.errors import Reject
from sdfleet.runtimes._instead import instead
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


def img2img_noise(
    variation: Variation | None,
    seeds: Sequence[int],
    subseeds: Sequence[int],
    shape: tuple[int, int, int],
    scale: int,
    multiplier: float = 1.0,
) -> torch.Tensor | None:
    """The starting noise of an image-to-image call (its images' ``seeds`` and, with a
    ``variation``, ``subseeds``; latent ``shape``), times ``multiplier`` as SD WebUI's image-to-image
    multiplies it; None where it is the pipeline's own (no variation, a multiplier of 1)."""
    if variation is None and multiplier == 1:
        return None
    if variation is not None:
        noise, _ = first_noise(variation, seeds, subseeds, shape, scale)
    else:
        noise = torch.stack([_randn(seed, shape) for seed in seeds])
    return noise * multiplier if multiplier != 1 else noise


class NoiseNotTaken(Reject):
    """The pipeline never noised its start with ``add_noise``: the given noise was not used."""

    def __init__(self) -> None:
        super().__init__(
            "the diffusers runtime does not implement variation seeds or initial_noise_multiplier "
            "where it starts from pure noise (denoising_strength 1 on an inpainting checkpoint or "
            "with a mask): lower the strength, or send the task to a queue with the a1111 runtime",
            code="unsupported_option",
        )


@contextmanager
def given_noise(scheduler: Any, noise: torch.Tensor | None) -> Iterator[None]:
    """For one pipeline call, ``noise`` (``img2img_noise``; None: nothing changes) in place of the
    noise the pipeline drew, wherever it hands that to ``scheduler.add_noise`` (its start; each
    step's re-noised input for a plain UNet's inpainting). ``NoiseNotTaken`` after a call that
    never did (a pipeline starting from pure noise), rather than images made without it."""
    if noise is None:
        yield
        return
    add = scheduler.add_noise
    taken = []

    def add_noise(original: torch.Tensor, drawn: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        given = noise.to(drawn.device, drawn.dtype) if drawn.shape == noise.shape else drawn
        taken.append(given is not drawn)
        noised: torch.Tensor = add(original, given, timesteps)
        return noised

    with instead(scheduler, "add_noise", add_noise):
        yield
    if not any(taken):
        raise NoiseNotTaken()


@contextmanager
def own_vae_draws(vae: Any, generators: Sequence[torch.Generator], seeds: Sequence[int]) -> Iterator[None]:
    """For one pipeline call given ``generators`` (one an image, seeded with ``seeds``), its VAE's
    encodings sample with a generator of their own for each image, seeded with its seed, so the
    call's generators draw the noise and nothing else."""
    own = {id(g): torch.Generator("cpu").manual_seed(seed) for g, seed in zip(generators, seeds, strict=True)}
    encode = vae.encode

    def encode_with_own_draws(*args: Any, **kwargs: Any) -> Any:
        out = encode(*args, **kwargs)
        dist = getattr(out, "latent_dist", None)
        if dist is not None:
            sample = dist.sample

            def sample_own(generator: Any = None) -> torch.Tensor:
                mine = own.get(id(generator)) if isinstance(generator, torch.Generator) else None
                drawn: torch.Tensor = sample(generator=generator if mine is None else mine)
                return drawn

            dist.sample = sample_own
        return out

    with instead(vae, "encode", encode_with_own_draws):
        yield


@contextmanager
def as_sd_webui(
    pipe: Any, call: dict[str, Any], seeds: Sequence[int], noise: torch.Tensor | None
) -> Iterator[None]:
    """A pipeline call (its arguments ``call``; ``seeds``: its images') drawing its noise as SD
    WebUI does: ``own_vae_draws``, and ``noise`` where it is given (``given_noise``)."""
    with own_vae_draws(pipe.vae, call["generator"], seeds), given_noise(pipe.scheduler, noise):
        yield
