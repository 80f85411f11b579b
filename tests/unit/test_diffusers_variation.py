"""Variation seeds (``subseed``, ``subseed_strength``, ``seed_resize_from``) in the diffusers runtime,
on a tiny random-weight model (CPU, 64x64, 2-3 steps). They were refused (``unsupported_option``),
and on image-to-image and a hires fix's second pass until later, as was image-to-image's
``initial_noise_multiplier``.

The noise is SD WebUI's (``ImageRNG.first``, checked against its code by hand: the issue note);
these tests hold what follows from it: strength 0 and 1 are the seed's and the variation seed's own
images (text-to-image, image-to-image, masked or not, both passes of a hires fix), the seed's
generator goes on into the steps, a batch shares its seed, batch-mates keep their images. The
images of image-to-image against SD WebUI's: ``tests/interop/test_a1111_interop.py``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from PIL import Image
from test_diffusers_batching import pixels, quiet
from test_inpainting_batched import batching

from sdfleet import variation
from sdfleet.errors import Reject, ValidationFailed
from sdfleet.limits import check_output_size
from sdfleet.models import ModelCatalog, checkpoint_hash, make_tiny
from sdfleet.runtimes._diffusers_noise import first_noise, slerp
from sdfleet.runtimes._diffusers_samplers import img2img_schedule
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.runtimes.unsupported import refuse
from sdfleet.tasks import TaskParams, TaskType


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    root = tmp_path_factory.mktemp("models")
    make_tiny(root, "tiny-a", seed=0)
    options = {"device": "cpu", "max_batch": 4, "max_batch_wait_ms": 20}
    return DiffusersRuntime.from_options(catalog=ModelCatalog(root), options=options, default_model="tiny-a")


def job(kind: TaskType = TaskType.TEXT_TO_IMAGE, task_id: str = "t-1", **fields: object) -> Job:
    base: dict[str, object] = {"prompt": "a red cat", "steps": 3, "width": 64, "height": 64, "seed": 1}
    prefixes = ("subseed", "seed_resize", "enable_hr", "hr_", "initial_noise", "override", "mask", "inpaint")
    extra = {k: fields.pop(k) for k in list(fields) if k.startswith(prefixes)}
    mask = extra.pop("mask", None)
    if mask is not None:
        extra["mask"] = "m"
    base |= fields | {"extra": extra}
    init = base.pop("init_images", [])
    assert isinstance(init, list) and (mask is None or isinstance(mask, bytes))
    return Job(task_id, kind, "tiny-a", TaskParams.model_validate(base), init_images=init, mask=mask)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def an_input() -> bytes:
    """An input with something in it: a blank one is the same at any noise."""
    rng = np.random.default_rng(5)
    return png(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))


def a_mask() -> bytes:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return png(mask)


I2I = TaskType.IMAGE_TO_IMAGE


def differ(a: bytes, b: bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


async def test_strength_one_is_the_variation_seeds_own_image(runtime: DiffusersRuntime) -> None:
    """All of the variation seed's noise: with a sampler that adds no noise of its own, the image
    the variation seed makes as a seed, bit for bit; strength 0 is the seed's."""
    varied = await runtime.run(job(sampler="Euler", subseed=7, subseed_strength=1.0), quiet)
    as_seed = await runtime.run(job(sampler="Euler", seed=7), quiet)
    assert pixels(varied.images[0]).tobytes() == pixels(as_seed.images[0]).tobytes()
    none = await runtime.run(job(sampler="Euler", subseed=7, subseed_strength=0), quiet)
    plain = await runtime.run(job(sampler="Euler"), quiet)
    assert none.images == plain.images and none.info["infotexts"] == plain.info["infotexts"]


async def test_the_seeds_generator_goes_on_into_an_ancestral_samplers_steps(
    runtime: DiffusersRuntime,
) -> None:
    """A strength near 0 is nearly the seed's image with ``Euler a`` too: the noise it adds at each
    step comes from the seed's generator past the starting noise, as when the pipeline draws it
    (a fresh generator would add the starting noise again)."""
    near = await runtime.run(job(sampler="Euler a", subseed=7, subseed_strength=1e-4), quiet)
    plain = await runtime.run(job(sampler="Euler a"), quiet)
    other = await runtime.run(job(sampler="Euler a", seed=2), quiet)
    assert near.images != plain.images
    assert differ(near.images[0], plain.images[0]) <= 3 < differ(other.images[0], plain.images[0])


async def test_a_batch_shares_its_seed_and_varies_by_consecutive_variation_seeds(
    runtime: DiffusersRuntime,
) -> None:
    result = await runtime.run(job(batch_size=3, seed=5, subseed=40, subseed_strength=0.3), quiet)
    info = result.info
    assert info["all_seeds"] == [5, 5, 5]  # SD WebUI's rule with a strength
    assert (info["subseed"], info["all_subseeds"], info["subseed_strength"]) == (40, [40, 41, 42], 0.3)
    assert len({pixels(png).tobytes() for png in result.images}) == 3
    model_hash = checkpoint_hash.sha256(runtime.catalog.resolve("tiny-a"))[:10]
    assert (
        f"Seed: 5, Size: 64x64, Model hash: {model_hash}, Model: tiny-a, Variation seed: 41, "
        "Variation seed strength: 0.3, Version: " in (info["infotexts"][1])
    )
    alone = await runtime.run(job(seed=5, subseed=41, subseed_strength=0.3), quiet)
    assert differ(alone.images[0], result.images[1]) <= 1  # image 2 of the batch is its own image
    random_subseed = await runtime.run(job(subseed_strength=0.3), quiet)  # subseed -1: drawn
    first = random_subseed.info["subseed"]
    assert 0 <= first < 2**32 and f"Variation seed: {first}," in random_subseed.info["infotexts"][0]


async def test_batch_mates_keep_their_own_variations(runtime: DiffusersRuntime) -> None:
    jobs = [
        job(task_id="t-1", seed=3, subseed=8, subseed_strength=0.5),
        job(task_id="t-2", seed=4, subseed=9, subseed_strength=0.5, batch_size=2),
    ]
    assert runtime.batch_key(jobs[0]) == runtime.batch_key(jobs[1]) is not None
    other = job(task_id="t-3", seed=3, subseed=8, subseed_strength=0.6)
    assert runtime.batch_key(other) != runtime.batch_key(jobs[0])  # a strength is the call's
    assert runtime.batch_key(job(task_id="t-4")) != runtime.batch_key(jobs[0])
    batched = await runtime.run_batch(jobs, [quiet, quiet])
    for one, outcome in zip(jobs, batched, strict=True):
        assert isinstance(outcome, RuntimeResult)
        alone = await runtime.run(one, quiet)
        assert [differ(b, a) <= 1 for b, a in zip(outcome.images, alone.images, strict=True)] == [True] * len(
            alone.images
        )
        assert outcome.info["all_subseeds"] == alone.info["all_subseeds"]


async def test_seed_resize_from_keeps_the_seeds_noise_in_the_middle(runtime: DiffusersRuntime) -> None:
    """``seed_resize_from`` makes the seed's noise at that size and sets it in the middle."""
    own = variation.Variation(0.0, -1, (64, 64))
    shape = (4, 8, 8)
    plain, _ = first_noise(variation.Variation(0.0, -1, None), [3], [0], shape, 8)
    same, _ = first_noise(own, [3], [0], shape, 8)
    assert torch.equal(plain, same)  # its own size: the plain noise
    small, gens = first_noise(variation.Variation(0.0, -1, (32, 48)), [3], [0], shape, 8)
    seeds_own = torch.randn((4, 6, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(small[0, :, 1:7, 2:6], seeds_own)
    past = torch.Generator().manual_seed(3)
    torch.randn(shape, generator=past)
    assert torch.equal(gens[0].get_state(), past.get_state())  # one image's noise drawn from it
    large, _ = first_noise(variation.Variation(0.0, -1, (96, 80)), [3], [0], shape, 8)
    seeds_large = torch.randn((4, 10, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(large[0], seeds_large[:, 1:9, 2:10])  # the middle of the larger noise
    result = await runtime.run(job(seed_resize_from_w=32, seed_resize_from_h=48), quiet)
    assert (
        result.info["all_seeds"] == [1]
        and "Model: tiny-a, Seed resize from: 32x48" in result.info["infotexts"][0]
    )
    assert (result.info["seed_resize_from_w"], result.info["seed_resize_from_h"]) == (32, 48)
    only_one_side = await runtime.run(job(seed_resize_from_w=32), quiet)  # SD WebUI needs both
    assert only_one_side.images == (await runtime.run(job(), quiet)).images


def test_slerp_keeps_the_ends_and_the_noises_scale() -> None:
    low, high = (torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    assert torch.equal(slerp(0.0, low, high), low) and torch.equal(slerp(1.0, low, high), high)
    mid = slerp(0.5, low, high)
    assert abs(float(mid.std()) - 1.0) < 0.2  # a linear mix would shrink it to about 0.71
    assert abs(float((low + high).mul(0.5).std()) - 0.71) < 0.15
    # one latent row: each column's two noises are parallel; SD WebUI's division by their sine
    # of 0 makes NaNs (its server answers 500 NansException), here a linear mix
    row = slerp(0.4, low[:, :1], high[:, :1])
    assert not torch.isnan(row).any()
    assert torch.allclose(row, 0.6 * low[:, :1] + 0.4 * high[:, :1])


@pytest.fixture
def noises(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The noise each Euler call noises its start with (an image-to-image call's, a hires pass's)."""
    seen: list[torch.Tensor] = []
    add = EulerDiscreteScheduler.add_noise

    def spy(self: Any, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        seen.append(noise.detach().clone().float())
        return add(self, original, noise, timesteps)

    monkeypatch.setattr(EulerDiscreteScheduler, "add_noise", spy)
    return seen


def drawn_first(seed: int, shape: tuple[int, ...] = (1, 4, 8, 8)) -> torch.Tensor:
    """What SD WebUI's ``ImageRNG.first`` draws for ``seed`` (no variation)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("masked", [False, True], ids=["image-to-image", "masked"])
async def test_image_to_image_noise_is_sd_webuis_with_variation_seeds(
    runtime: DiffusersRuntime, noises: list[torch.Tensor], masked: bool
) -> None:
    """Its noise is the first draw of the seed's generator, as SD WebUI's ``ImageRNG`` (it was the
    second: the pipeline sampled its VAE's encoding with it first), and with variation seeds (they
    were refused) SD WebUI's noise of them: at strength 1 the variation seed's own."""
    given = {"mask": a_mask()} if masked else {}
    common = {"sampler": "Euler", "init_images": [an_input()], "denoising_strength": 0.75} | given
    plain = await runtime.run(job(I2I, seed=7, **common), quiet)
    assert torch.equal(noises[-1], drawn_first(7))
    varied = await runtime.run(job(I2I, subseed=7, subseed_strength=1.0, **common), quiet)
    assert torch.equal(noises[-1], drawn_first(7))
    half = await runtime.run(job(I2I, subseed=7, subseed_strength=0.5, **common), quiet)
    mixed, _ = first_noise(variation.Variation(0.5, 7, None), [1], [7], (4, 8, 8), 8)
    assert torch.equal(noises[-1], mixed)
    assert half.images[0] not in (plain.images[0], varied.images[0])
    assert (
        "Variation seed: 7, Variation seed strength: 0.5, Denoising strength: 0.75"
        in half.info["infotexts"][0]
    )
    none = await runtime.run(job(I2I, subseed=7, subseed_strength=0, **common), quiet)
    assert none.images == (await runtime.run(job(I2I, **common), quiet)).images


async def test_both_passes_of_a_hires_fix_take_the_variation_seeds_noise(
    runtime: DiffusersRuntime, noises: list[torch.Tensor]
) -> None:
    """SD WebUI draws the second pass's noise as the first's, with the variation seeds, at the
    pass's size (it was refused with ``enable_hr``): at strength 1 the variation seed's own image
    through both passes of a latent upscale, and the variation seed's noise for an image upscaler's
    (whose input is encoded again: its VAE's sample is the seed's)."""
    hires = {"sampler": "Euler", "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent"}
    hires |= {"denoising_strength": 0.6, "hr_second_pass_steps": 2}
    varied = await runtime.run(job(subseed=7, subseed_strength=1.0, **hires), quiet)
    as_seed = await runtime.run(job(seed=7, **hires), quiet)
    assert pixels(varied.images[0]).shape == (96, 96, 3)
    assert pixels(varied.images[0]).tobytes() == pixels(as_seed.images[0]).tobytes()
    await runtime.run(job(subseed=7, subseed_strength=1.0, **hires | {"hr_upscaler": "Lanczos"}), quiet)
    assert torch.equal(noises[-1], drawn_first(7, (1, 4, 12, 12)))
    resized = await runtime.run(job(seed_resize_from_w=32, seed_resize_from_h=32, **hires), quiet)
    middle, _ = first_noise(variation.Variation(0.0, -1, (32, 32)), [1], [0], (4, 12, 12), 8)
    assert torch.equal(noises[-1], middle)
    plain = await runtime.run(job(**hires), quiet)
    assert resized.images != plain.images and "Seed resize from: 32x32" in resized.info["infotexts"][0]


async def test_the_noise_multiplier_of_image_to_image(runtime: DiffusersRuntime) -> None:
    """``initial_noise_multiplier`` (and the option of that name) scales the starting noise, said
    as SD WebUI says it; 1 is the default's image, bit for bit, and a batch shares one."""
    common = {"sampler": "Euler", "init_images": [an_input()], "denoising_strength": 0.75}
    plain = await runtime.run(job(I2I, **common), quiet)
    one = await runtime.run(job(I2I, initial_noise_multiplier=1, **common), quiet)
    assert one.images == plain.images and one.info["infotexts"] == plain.info["infotexts"]
    less = await runtime.run(job(I2I, initial_noise_multiplier=0.5, **common), quiet)
    assert less.images != plain.images
    assert "Denoising strength: 0.75, Noise multiplier: 0.5, Version: " in less.info["infotexts"][0]
    option = job(I2I, override_settings={"initial_noise_multiplier": 0.5}, **common)
    assert (await runtime.run(option, quiet)).images == less.images
    field_first = job(
        I2I, initial_noise_multiplier=0.5, override_settings={"initial_noise_multiplier": 2}, **common
    )
    assert (await runtime.run(field_first, quiet)).images == less.images  # the field, as SD WebUI
    assert runtime.batch_key(job(I2I, initial_noise_multiplier=0.5, **common)) != runtime.batch_key(
        job(I2I, **common)
    )
    t2i = await runtime.run(job(sampler="Euler", override_settings={"initial_noise_multiplier": 0.5}), quiet)
    assert t2i.images == (await runtime.run(job(sampler="Euler"), quiet)).images  # image-to-image's only


async def test_where_the_runtime_starts_from_pure_noise_it_refuses_by_name(runtime: DiffusersRuntime) -> None:
    """A masked task at denoising strength 1 starts from noise alone here (SD WebUI noises its
    input even there): variation seeds and a multiplier are refused, not dropped."""
    masked = {"init_images": [an_input()], "mask": a_mask(), "denoising_strength": 1.0}
    for fields, word in (
        ({"subseed_strength": 0.3}, r"subseed_strength \(variation seeds\)"),
        ({"seed_resize_from_w": 32, "seed_resize_from_h": 32}, r"seed_resize_from_w/h \(variation seeds\)"),
        ({"initial_noise_multiplier": 0.9}, r"initial_noise_multiplier=0\.9"),
    ):
        asked = job(I2I, **masked, **fields)
        with pytest.raises(Reject, match=word + " with a mask at denoising_strength 1") as e:
            await runtime.run(asked, quiet)
        assert e.value.code == "unsupported_option"
        refuse("a1111", I2I, asked.params)  # SD WebUI makes them
    lower = await runtime.run(job(I2I, **masked | {"denoising_strength": 0.9}, subseed_strength=0.3), quiet)
    assert len(lower.images) == 1


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"subseed_strength": "0.5"}, "subseed_strength must be a number, not '0.5'"),
        ({"subseed_strength": True}, "subseed_strength must be a number"),
        ({"subseed_strength": 0.5, "subseed": 2**40}, "subseed must be an integer from -1 to 4294967295"),
        ({"subseed_strength": 0.5, "subseed": 1.5}, "subseed must be an integer"),
        ({"seed_resize_from_w": "64", "seed_resize_from_h": 64}, "seed_resize_from_w must be an integer"),
    ],
)
async def test_values_that_are_no_seed_or_size_are_invalid(
    runtime: DiffusersRuntime, fields: dict[str, object], words: str
) -> None:
    """A message published past the API may hold anything; the runtime names the field."""
    with pytest.raises(Reject, match=words) as e:
        await runtime.run(job(**fields), quiet)
    assert e.value.code == "invalid_params"


async def test_noise_larger_than_the_runtime_allows_is_refused_before_it_is_made(
    runtime: DiffusersRuntime,
) -> None:
    """Its noise is made at that size: 100000x100000 would be 2.5 GB of it for a 64x64 image."""
    huge = job(seed_resize_from_w=100_000, seed_resize_from_h=100_000)
    with pytest.raises(Reject, match=r"seed_resize_from 100000x100000 is more than the \d+ pixels") as e:
        await runtime.run(huge, quiet)
    assert e.value.code == "too_large"
    with pytest.raises(
        ValidationFailed, match="seed_resize_from 100000x100000 is over the maximum 2048x2048"
    ):
        check_output_size(TaskType.TEXT_TO_IMAGE, huge.params, [], 2048, 2048)  # the API, any runtime


async def test_image_to_image_batch_mates_keep_their_variations_and_multiplier(
    runtime: DiffusersRuntime,
) -> None:
    common = {"init_images": [an_input()], "denoising_strength": 0.75, "subseed_strength": 0.5}
    common |= {"initial_noise_multiplier": 0.8}
    jobs = [
        job(I2I, "t-1", seed=3, subseed=8, **common),
        job(I2I, "t-2", seed=4, subseed=9, batch_size=2, **common),
    ]
    assert runtime.batch_key(jobs[0]) == runtime.batch_key(jobs[1]) is not None
    batched = await runtime.run_batch(jobs, [quiet, quiet])
    for one, outcome in zip(jobs, batched, strict=True):
        assert isinstance(outcome, RuntimeResult)
        alone = await runtime.run(one, quiet)
        assert all(differ(b, a) <= 1 for b, a in zip(outcome.images, alone.images, strict=True))
        assert outcome.info["infotexts"] == alone.info["infotexts"]


async def test_an_inpainting_checkpoint_from_pure_noise_refuses_them_when_it_runs(
    tmp_path: Path,
) -> None:
    """Its image-to-image at strength 1 starts from noise alone (its whole image masked, as SD
    WebUI runs it): the variation is refused when the call finds it so, not dropped."""
    inpainting = batching(tmp_path, inpainting_unet=True)
    varied = job(I2I, init_images=[an_input()], denoising_strength=1.0, subseed=7, subseed_strength=0.5)
    with pytest.raises(Reject, match="where it starts from pure noise") as e:
        await inpainting.run(varied, quiet)
    assert e.value.code == "unsupported_option"
    lower = job(I2I, init_images=[an_input()], denoising_strength=0.5, subseed=7, subseed_strength=0.5)
    assert len((await inpainting.run(lower, quiet)).images) == 1


def test_sd_webuis_image_to_image_schedule() -> None:
    """SD WebUI's k-diffusion samplers denoise int(min(d, 0.999) × n) + 1 of n steps at strength d
    (``setup_img2img_steps``); the strength handed to diffusers makes exactly that many
    (``get_timesteps``: int(n × strength)), whatever the float rounding; a task naming no sampler
    keeps diffusers' own, DDIM, PLMS and UniPC have their own (``test_diffusers_timesteps``)."""
    for steps in range(1, 61):
        for d in (k / 200 for k in range(1, 201)):
            n, strength = img2img_schedule("Euler a", steps, d)
            assert n == steps and int(n * strength) == min(int(min(d, 0.999) * steps) + 1, steps), (steps, d)
    assert img2img_schedule("DPM++ 2M Karras", 8, 0.6) == (8, 0.625)
    assert img2img_schedule(None, 8, 0.6) == (8, 0.6)
    for key in ("DDIM", "PLMS"):  # SD WebUI's (``test_diffusers_timesteps``)
        assert img2img_schedule(key, 8, 0.6) == (8, 0.5)
    assert img2img_schedule("UniPC", 8, 0.6) == (8, 0.5)  # t_enc 4, from SD WebUI's timestep below
    assert img2img_schedule("UniPC", 8, 0.05) == (20, 0.05)  # one step at least, as before


async def test_image_to_image_starts_where_sd_webuis_does(
    runtime: DiffusersRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 0.6 of 8 Euler steps the input is noised to the sigma 5 steps before the schedule's end,
    as SD WebUI's ``sigmas[steps - t_enc - 1]``, not 4 (diffusers' own), on SD WebUI's schedule:
    k-diffusion's timesteps from 999 to 0 in equal steps (the model's config says ``leading``)."""
    started: list[float] = []
    add = EulerDiscreteScheduler.add_noise

    def spy(self: Any, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        started.append(float(timesteps.flatten()[0]))
        return add(self, original, noise, timesteps)

    monkeypatch.setattr(EulerDiscreteScheduler, "add_noise", spy)
    await runtime.run(
        job(I2I, sampler="Euler", steps=8, init_images=[an_input()], denoising_strength=0.6), quiet
    )
    k_diffusion = torch.linspace(999, 0, 8)  # DiscreteSchedule.get_sigmas(8)'s timesteps
    assert started == pytest.approx([float(k_diffusion[8 - 5])])


async def test_unipc_image_to_image_runs_sd_webuis_schedule(
    runtime: DiffusersRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the runtime's image-to-image pipeline, 8 UniPC steps at 0.6 give the UNet SD WebUI's
    4 model times from 376, its DDIM timestep below the noise (``_diffusers_unipc``), where
    diffusers' tail of a whole schedule would give 4 from 499.5."""
    given: list[float] = []
    forward = UNet2DConditionModel.forward

    def spy(self: Any, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        given.append(float(torch.as_tensor(timestep).flatten()[0]))
        return forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    made = await runtime.run(
        job(I2I, sampler="UniPC", steps=8, init_images=[an_input()], denoising_strength=0.6), quiet
    )
    assert given == [376.0, 282.0, 188.0, 94.0] and len(made.images) == 1
