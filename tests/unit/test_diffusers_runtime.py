"""The in-process diffusers runtime against tiny random-weight models (CPU, 64x64, 2-4 steps)."""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from sdfleet.errors import ConfigError, Interrupted, ModelLoadError, Reject
from sdfleet.infotext import VERSION
from sdfleet.models import ModelCatalog, checkpoint_hash, make_tiny
from sdfleet.runtimes import RUNTIMES, build_runtime
from sdfleet.runtimes._diffusers_info import sampler_name_of
from sdfleet.runtimes._diffusers_pipes import (
    fit,
    img2img_from,
    inpaint_from,
    load_pipeline,
    make_scheduler,
    set_tiling,
)
from sdfleet.runtimes._diffusers_samplers import SAMPLERS, sampler_key
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> ModelCatalog:
    root = tmp_path_factory.mktemp("models")
    make_tiny(root, "tiny-a", seed=0)
    make_tiny(root, "tiny-b", seed=1)
    make_tiny(root, "tiny-a-sf", seed=0, single_file=True)
    broken = root / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return ModelCatalog(root)


@pytest.fixture(scope="module")
def runtime(catalog: ModelCatalog) -> DiffusersRuntime:
    return DiffusersRuntime(catalog, default_model="tiny-a", device="cpu")


def job(kind: TaskType = TaskType.TEXT_TO_IMAGE, model: str | None = None, **params: object) -> Job:
    base: dict[str, object] = {"prompt": "a red cat", "steps": 2, "width": 64, "height": 64, "seed": 1}
    base.update(params)
    init = base.pop("init_images", [])
    assert isinstance(init, list)
    return Job("t-1", kind, model, TaskParams.model_validate(base), init_images=init)


async def no_progress(value: float) -> None:
    return None


def size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


async def test_txt2img_size_batch_and_info(runtime: DiffusersRuntime) -> None:
    result = await runtime.run(job(width=64, height=48, batch_size=2, seed=5, steps=3), no_progress)
    assert [size(png) for png in result.images] == [(64, 48), (64, 48)]
    assert all(png.startswith(b"\x89PNG") for png in result.images)
    assert result.seed == 5 and result.model == "tiny-a" and runtime.loaded_model == "tiny-a"
    info = result.info
    assert (info["seed"], info["all_seeds"], info["steps"], info["width"], info["height"]) == (
        5,
        [5, 6],
        3,
        64,
        48,
    )
    assert info["sd_model_checkpoint"] == "tiny-a" and info["prompt"] == "a red cat"
    assert info["note"] == "random weights: output is noise from a tiny test model"
    assert info["sampler_name"] == "DDIM"  # the model's own scheduler when the job names none


async def test_same_seed_same_bytes_other_seed_differs(runtime: DiffusersRuntime) -> None:
    first = await runtime.run(job(seed=123, sampler="Euler a"), no_progress)
    again = await runtime.run(job(seed=123, sampler="Euler a"), no_progress)
    other = await runtime.run(job(seed=124, sampler="Euler a"), no_progress)
    assert first.images == again.images
    assert first.images != other.images


async def test_random_seed_is_reported(runtime: DiffusersRuntime) -> None:
    result = await runtime.run(job(seed=-1), no_progress)
    assert result.seed is not None and 0 <= result.seed < 2**32
    assert result.info["seed"] == result.seed


async def test_img2img_resizes_init_image(runtime: DiffusersRuntime) -> None:
    init = Image.new("RGB", (100, 30), (200, 10, 10))
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    result = await runtime.run(
        job(
            TaskType.IMAGE_TO_IMAGE,
            width=64,
            height=32,
            steps=4,
            denoising_strength=0.5,
            init_images=[buf.getvalue()],
        ),
        no_progress,
    )
    assert [size(png) for png in result.images] == [(64, 32)]
    assert result.info["denoising_strength"] == 0.5


async def test_the_infotext_says_what_png_info_needs_to_make_the_image_again(
    runtime: DiffusersRuntime,
) -> None:
    """Image-to-image's denoising strength and clip skip were missing: SD WebUI's PNG Info read the
    image back as another one. SD WebUI 1.10.1 writes ``…, Model: m, Denoising strength: 0.5, Clip
    skip: 2, Version: …`` (``tests/data/sdwebui-1.10.1.json``)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="PNG")
    i2i = job(
        TaskType.IMAGE_TO_IMAGE, steps=4, denoising_strength=0.5, clip_skip=2, init_images=[buf.getvalue()]
    )
    made = await runtime.run(i2i, no_progress)
    said = "Size: 64x64, Model hash: {}, Model: tiny-a, Denoising strength: 0.5, Clip skip: 2, Version: {}"
    model_hash = checkpoint_hash.sha256(runtime.catalog.resolve("tiny-a"))[:10]
    assert said.format(model_hash, VERSION) in made.info["infotexts"][0]
    plain = await runtime.run(job(), no_progress)
    assert plain.info["infotexts"][0].endswith(
        f"Seed: 1, Size: 64x64, Model hash: {model_hash}, Model: tiny-a, Version: {VERSION}"
    )


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return buf.getvalue()


def _png_sized(size: tuple[int, int]) -> bytes:
    """Red, green and blue thirds side by side: where a resize crops or fills shows."""
    image = Image.new("RGB", size, (20, 200, 20))
    image.paste((220, 20, 20), (0, 0, size[0] // 3, size[1]))
    image.paste((20, 20, 220), (2 * size[0] // 3, 0, size[0], size[1]))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _diff(a: bytes, b: bytes) -> int:
    """Largest difference of two PNGs' pixel values."""
    x, y = (np.asarray(Image.open(io.BytesIO(p)).convert("RGB"), dtype=int) for p in (a, b))
    return int(abs(x - y).max())


async def test_img2img_batch_item_i_starts_from_input_i(runtime: DiffusersRuntime) -> None:
    """SD WebUI's img2img: with several inputs, batch item i starts from input i. Every item was
    made from the first input (a batch of video frames came back as the first frame, N times)."""
    red, blue = _png((220, 20, 20)), _png((20, 20, 220))
    kind, common = TaskType.IMAGE_TO_IMAGE, {"seed": 9, "steps": 4, "denoising_strength": 0.5}
    both = await runtime.run(job(kind, init_images=[red, blue], batch_size=2, **common), no_progress)
    reds = await runtime.run(job(kind, init_images=[red], batch_size=2, **common), no_progress)
    alone_blue = await runtime.run(job(kind, init_images=[blue], **{**common, "seed": 10}), no_progress)
    # a batch's item equals the same item run alone up to float rounding (±1 on CPU); the input
    # of its own, not the first one, shows in item 2
    assert _diff(both.images[0], reds.images[0]) <= 1
    assert _diff(both.images[1], alone_blue.images[0]) <= 1
    assert _diff(both.images[1], reds.images[1]) > 32
    with pytest.raises(Reject, match="bad number of images passed: 3; expecting 2 or less") as e:
        await runtime.run(job(kind, init_images=[red, blue, red], batch_size=2, **common), no_progress)
    assert e.value.code == "invalid_params"


async def test_n_iter_makes_its_batches_with_consecutive_seeds(runtime: DiffusersRuntime) -> None:
    """SD WebUI's batch count: ``n_iter`` batches of ``batch_size``, seeds following on. It was
    refused as an unsupported option."""
    two_by_two = await runtime.run(job(batch_size=2, seed=40, extra={"n_iter": 2}), no_progress)
    four = await runtime.run(job(batch_size=4, seed=40), no_progress)
    assert two_by_two.info["all_seeds"] == [40, 41, 42, 43] and two_by_two.info["batch_size"] == 2
    assert len(two_by_two.images) == 4
    for a, b in zip(two_by_two.images, four.images, strict=True):
        assert _diff(a, b) <= 1  # the same seeds make the same images
    with pytest.raises(Reject) as e:
        await runtime.run(job(batch_size=8, extra={"n_iter": 3}), no_progress)
    assert e.value.code == "too_large" and "not 24 (batch_size 8 × n_iter 3)" in e.value.reason


async def test_a_batchs_seeds_go_on_past_2_to_the_32(runtime: DiffusersRuntime) -> None:
    """SD WebUI's consecutive seeds go on past 2³² − 1 (``torch.manual_seed`` takes 64 bits); here
    they wrapped to 0, so an image SD WebUI says is seed 4294967296's was said to be seed 0's. The
    CPU generator both draw noise from reads a seed's low 32 bits: the image is seed 0's in both."""
    top = 2**32 - 1
    made = await runtime.run(job(batch_size=2, seed=top), no_progress)
    assert made.info["all_seeds"] == [top, top + 1] and made.seed == top
    assert "Seed: 4294967296," in made.info["infotexts"][1]
    zero = await runtime.run(job(seed=0), no_progress)
    assert _diff(made.images[1], zero.images[0]) <= 1


async def test_img2img_with_several_inputs_makes_a_batch_as_large_as_the_inputs(
    runtime: DiffusersRuntime,
) -> None:
    """A task published past the API (the seed's Lambda) keeps the batch_size it was sent with:
    two inputs and ``batch_size`` 4 made 4 images, where SD WebUI makes 2 (the API sets it)."""
    red, blue = _png((220, 20, 20)), _png((20, 20, 220))
    common = {"seed": 9, "denoising_strength": 0.5, "batch_size": 4}
    result = await runtime.run(job(TaskType.IMAGE_TO_IMAGE, init_images=[red, blue], **common), no_progress)
    assert len(result.images) == 2 and result.info["all_seeds"] == [9, 10]


@pytest.mark.parametrize("sdxl", [False, True])
def test_pixels_are_truncated_to_8_bits_as_sd_webuis(tmp_path: Path, sdxl: bool) -> None:
    """SD WebUI makes its 8-bit pixels with ``(255 × x).astype(uint8)``, truncating; diffusers
    rounds, which put half the pixels of images otherwise equal to SD WebUI's one above (0.5 of 255
    apart on average, the issue note). Every pipeline the runtime makes truncates: text-to-image,
    and image-to-image and inpainting made from it."""
    make_tiny(tmp_path, "t", seed=0, sdxl=sdxl)
    pipe = load_pipeline(ModelCatalog(tmp_path).resolve("t"), "cpu", torch.float32)
    start = Image.new("RGB", (64, 64), (200, 30, 90))
    calls = {
        "text": (pipe, {}),
        "image": (img2img_from(pipe), {"image": start, "strength": 0.6}),
        "masked": (inpaint_from(pipe), {"image": start, "mask_image": Image.new("L", (64, 64), 255)}),
    }
    for name, (made, given) in calls.items():

        def run(output_type: str, made: object = made, given: dict[str, object] = given) -> object:
            args = {"num_inference_steps": 2, "width": 64, "height": 64, "output_type": output_type}
            seeded = torch.Generator().manual_seed(4)
            return made("a cat", generator=seeded, **args, **given).images[0]  # type: ignore[operator]

        floats = np.asarray(run("np"), dtype=np.float32)
        pixels = np.asarray(run("pil"))
        assert (pixels == (floats * 255).astype(np.uint8)).all(), name
        assert (pixels != np.round(floats * 255)).any(), name  # diffusers' own would differ


@pytest.mark.parametrize("sdxl", [False, True])
def test_tiling_wraps_the_image_around_its_edges(tmp_path: Path, sdxl: bool) -> None:
    """SD WebUI's ``tiling`` (it was refused as unsupported): with circular padding the pipeline
    commutes with a shift of its starting noise by whole latent blocks, so the image wraps around
    at its edges; with zero padding the edges show."""
    make_tiny(tmp_path, "t", seed=0, sdxl=sdxl)
    pipe = load_pipeline(ModelCatalog(tmp_path).resolve("t"), "cpu", torch.float32)
    noise = torch.Generator().manual_seed(3)
    latents = torch.randn((1, pipe.unet.config.in_channels, 16, 16), generator=noise)

    def image(start: torch.Tensor) -> np.ndarray:
        out = pipe("tiles", latents=start, num_inference_steps=2, width=128, height=128, output_type="np")
        return np.asarray(out.images[0] * 255, dtype=np.float32)

    shifted = torch.roll(latents, shifts=8, dims=3)  # 8 latent pixels: 64 image pixels
    set_tiling(pipe, True)
    tiled = image(latents)
    assert np.abs(np.roll(tiled, 64, axis=1) - image(shifted)).max() <= 1
    set_tiling(pipe, False)
    plain = image(latents)
    assert np.abs(np.roll(plain, 64, axis=1) - image(shifted)).max() > 8
    assert np.abs(plain - tiled).max() > 8
    # a tiled VAE decode would wrap each tile around itself: one piece while tiling
    set_tiling(pipe, True, vae_tiling=True)
    assert pipe.vae.use_tiling is False
    set_tiling(pipe, False, vae_tiling=True)
    assert pipe.vae.use_tiling is True


async def test_a_tiling_task_leaves_the_next_task_as_it_was(runtime: DiffusersRuntime) -> None:
    before = await runtime.run(job(seed=21), no_progress)
    tiled = await runtime.run(job(seed=21, extra={"tiling": True}), no_progress)
    after = await runtime.run(job(seed=21), no_progress)
    assert before.images == after.images and tiled.images != before.images
    assert tiled.info["infotexts"][0].endswith(f", Tiling: True, Version: {VERSION}")
    assert runtime.batch_key(job(extra={"tiling": True})) != runtime.batch_key(job())


async def test_ddim_takes_its_eta_and_other_samplers_leave_it(runtime: DiffusersRuntime) -> None:
    """SD WebUI's ``eta`` (DDIM's noise; 0 by default): it was dropped without a word."""
    plain = await runtime.run(job(sampler="DDIM", seed=8, steps=4), no_progress)
    noisy = await runtime.run(job(sampler="DDIM", seed=8, steps=4, extra={"eta": 1.0}), no_progress)
    assert _diff(plain.images[0], noisy.images[0]) > 8
    euler = await runtime.run(job(sampler="Euler", seed=8), no_progress)
    still = await runtime.run(job(sampler="Euler", seed=8, extra={"eta": 0.3}), no_progress)
    assert euler.images == still.images
    with_eta = runtime.batch_key(job(sampler="DDIM", extra={"eta": 1.0}))
    assert with_eta != runtime.batch_key(job(sampler="DDIM"))
    for sampler in ("DPM2 a", "DPM++ 2M SDE"):  # their eta other than 1 (SD WebUI's): not implemented
        with pytest.raises(Reject) as e:
            await runtime.run(job(sampler=sampler, extra={"eta": 0.5}), no_progress)
        assert e.value.code == "unsupported_option" and f"eta=0.5 (with {sampler})" in e.value.reason


async def test_euler_a_takes_its_eta(runtime: DiffusersRuntime) -> None:
    """Euler a's ``eta`` other than 1 was refused. It scales the share of each step's noise drawn
    afresh, as k-diffusion's does: at 0 no noise (Euler's image), near 1 diffusers' own Euler a;
    the infotext says ``Eta`` as SD WebUI does."""
    ancestral = await runtime.run(job(sampler="Euler a", seed=8, steps=6), no_progress)
    near = await runtime.run(job(sampler="Euler a", seed=8, steps=6, extra={"eta": 1 - 1e-9}), no_progress)
    assert _diff(near.images[0], ancestral.images[0]) <= 1  # the same draws, the same step
    euler = await runtime.run(job(sampler="Euler", seed=8, steps=6), no_progress)
    still = await runtime.run(job(sampler="Euler a", seed=8, steps=6, extra={"eta": 0}), no_progress)
    assert _diff(still.images[0], euler.images[0]) <= 1
    half = await runtime.run(job(sampler="Euler a", seed=8, steps=6, extra={"eta": 0.5}), no_progress)
    assert _diff(half.images[0], euler.images[0]) > 8 and _diff(half.images[0], ancestral.images[0]) > 8
    assert half.info["infotexts"][0].endswith(f"Model: tiny-a, Eta: 0.5, Version: {VERSION}")
    assert "Eta" not in ancestral.info["infotexts"][0] and "Eta:" in still.info["infotexts"][0]
    assert runtime.batch_key(job(sampler="Euler a", extra={"eta": 0.5})) != runtime.batch_key(
        job(sampler="Euler a")
    )


async def test_euler_runs_k_diffusions_churn(runtime: DiffusersRuntime) -> None:
    """``s_churn`` (with ``s_tmin``, ``s_tmax``, ``s_noise``) was refused. SD WebUI's Euler raises
    each step's sigma, noises the latents to it and denoises there: where no sigma is in range the
    image is plain Euler's (its noise drawn and unused, as there), else another, the same for the
    same seed, batched or alone; SD WebUI says no word of it (a request's fields: its options'
    are said, and refused here as other overrides are)."""
    euler = await runtime.run(job(sampler="Euler", seed=8, steps=6), no_progress)
    unused = await runtime.run(
        job(sampler="Euler", seed=8, steps=6, extra={"s_churn": 1, "s_tmin": 99}), no_progress
    )
    assert unused.images == euler.images
    churned = job(sampler="Euler", seed=8, steps=6, extra={"s_churn": 1.0})
    made, again = await runtime.run(churned, no_progress), await runtime.run(churned, no_progress)
    assert made.images == again.images and _diff(made.images[0], euler.images[0]) > 8
    assert made.info["infotexts"][0] == euler.info["infotexts"][0]
    quiet_noise = job(sampler="Euler", seed=8, steps=6, extra={"s_churn": 1.0, "s_noise": 0})
    assert _diff((await runtime.run(quiet_noise, no_progress)).images[0], made.images[0]) > 8
    other = job(sampler="Euler", seed=9, steps=6, extra={"s_churn": 1.0})
    assert (
        runtime.batch_key(churned)
        == runtime.batch_key(other)
        != runtime.batch_key(job(sampler="Euler", steps=6))
    )
    batched = await runtime.run_batch([churned, other], [no_progress, no_progress])
    for alone, outcome in zip([made, await runtime.run(other, no_progress)], batched, strict=True):
        assert isinstance(outcome, RuntimeResult) and _diff(outcome.images[0], alone.images[0]) <= 1
    ancestral = await runtime.run(job(sampler="Euler a", seed=8, steps=6), no_progress)
    ignored = await runtime.run(job(sampler="Euler a", seed=8, steps=6, extra={"s_noise": 0.5}), no_progress)
    assert ignored.images == ancestral.images  # SD WebUI 1.10 hands its Euler a no s_noise
    for sampler, field in (("Heun", "s_churn"), ("DPM2 a", "s_noise")):
        with pytest.raises(Reject) as e:
            await runtime.run(job(sampler=sampler, extra={field: 0.5}), no_progress)
        assert e.value.code == "unsupported_option" and f"{field}=0.5 (with {sampler})" in e.value.reason


def test_fit_is_sd_webuis_resize() -> None:
    """``resize_mode`` 0 stretches, 1 covers and crops, 2 fits and fills the bands from the edges.
    Checked by hand against SD WebUI 1.10.1's own ``resize_image``: 898 resizes of random images
    to random sizes, pixel for pixel the same."""
    image = Image.new("RGB", (128, 64), (0, 200, 0))
    image.paste((200, 0, 0), (0, 0, 32, 64))  # red left quarter, blue right quarter
    image.paste((0, 0, 200), (96, 0, 128, 64))
    stretched = np.asarray(fit(image, (64, 64), 0))
    assert tuple(stretched[32, 2]) == (200, 0, 0)
    cropped = np.asarray(fit(image, (64, 64), 1))  # the middle 64 columns: green only
    assert cropped.shape == (64, 64, 3) and (np.abs(cropped.astype(int) - (0, 200, 0)) <= 2).all()
    filled = np.asarray(fit(image, (64, 64), 2))  # 64x32 in the middle, bands from its edge rows
    assert tuple(filled[32, 2]) == (200, 0, 0) and tuple(filled[32, 61]) == (0, 0, 200)
    assert (filled[:16] == filled[16]).all() and (filled[48:] == filled[47]).all()


async def test_img2img_resize_mode_is_taken(runtime: DiffusersRuntime) -> None:
    wide = _png_sized((128, 64))
    common = {"seed": 4, "denoising_strength": 0.4}
    kind = TaskType.IMAGE_TO_IMAGE
    made = [
        await runtime.run(job(kind, init_images=[wide], extra={"resize_mode": m}, **common), no_progress)
        for m in (0, 1, 2)
    ]
    assert _diff(made[0].images[0], made[1].images[0]) > 8 and _diff(made[1].images[0], made[2].images[0]) > 8


async def test_img2img_without_image_is_rejected(runtime: DiffusersRuntime) -> None:
    with pytest.raises(Reject):
        await runtime.run(job(TaskType.IMAGE_TO_IMAGE), no_progress)


@pytest.mark.parametrize(
    ("upscaler", "kind", "count"),
    [(None, TaskType.EXTRA_SINGLE_IMAGE, 1), ("Nearest", TaskType.EXTRA_BATCH_IMAGES, 2)],
)
async def test_extras_upscale(
    runtime: DiffusersRuntime, upscaler: str | None, kind: TaskType, count: int
) -> None:
    src = (await runtime.run(job(width=64, height=48), no_progress)).images[0]
    result = await runtime.run(
        job(kind, upscaler=upscaler, upscaling_resize=2.5, init_images=[src, src]), no_progress
    )
    assert [size(png) for png in result.images] == [(160, 120)] * count


async def test_extras_unknown_upscaler_is_rejected(runtime: DiffusersRuntime) -> None:
    src = (await runtime.run(job(), no_progress)).images[0]
    with pytest.raises(Reject, match="R-ESRGAN 4x\\+"):
        await runtime.run(
            job(TaskType.EXTRA_SINGLE_IMAGE, upscaler="R-ESRGAN 4x+", init_images=[src]), no_progress
        )


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_maps_to_its_scheduler(runtime: DiffusersRuntime, name: str) -> None:
    cls_name, overrides = SAMPLERS[name]
    base = {
        "num_train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
    }
    scheduler = make_scheduler(sampler_key(name.upper()) or "", base)
    assert cls_name in {kind.__name__ for kind in type(scheduler).__mro__}  # or sdfleet's of it
    if name.startswith("DPM2"):  # sdfleet's own (_diffusers_dpm2) named as diffusers' would be
        assert sampler_name_of(scheduler) == name
    for key, value in overrides.items():
        assert scheduler.config[key] == value
    assert bool(scheduler.config.get("use_karras_sigmas", False)) == ("Karras" in name)


SD15_SCHEDULER = {  # SD 1.5's own scheduler config, as single-file loading gives it
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def k_diffusion_sigmas(steps: int, karras: bool = False) -> list[float]:
    """k-diffusion's ``DiscreteSchedule.get_sigmas`` (log-sigma interpolated at timesteps 999 to 0
    in equal steps) and ``get_sigmas_karras`` between the model's ends (rho 7), for SD's betas:
    what SD WebUI's k-diffusion samplers step over (Automatic / Uniform, Karras)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    log = (((1 - alphas) / alphas) ** 0.5).log()
    if karras:
        low, high = log[0].exp() ** (1 / 7), log[-1].exp() ** (1 / 7)
        return [float((high + r * (low - high)) ** 7) for r in torch.linspace(0, 1, steps)] + [0.0]
    t = torch.linspace(999, 0, steps, dtype=torch.float64)
    below, above, w = t.floor().long(), t.ceil().long(), t.frac()
    return [float(s) for s in ((1 - w) * log[below] + w * log[above]).exp()] + [0.0]


@pytest.mark.parametrize("name", ["Euler", "Euler a", "LMS", "Heun", "Euler Karras", "LMS Karras"])
def test_k_diffusion_samplers_step_over_sd_webuis_schedule(name: str) -> None:
    """The model's config says ``leading`` from 1 (SD 1.5's, SDXL's): 951 to 1 of 20 steps, a
    first sigma of 10.2 where SD WebUI's is 14.6, and Karras sigmas between those. SD WebUI's
    k-diffusion samplers step from timestep 999 to 0; so do these (Heun twice a step), and the
    images of a real SD WebUI fell from 10.2 of 255 apart to 0.5 (the issue note). DDIM steps
    over SD WebUI's own timesteps from 1 (``test_diffusers_timesteps``): at 20 steps all but 1."""
    scheduler = make_scheduler(name, SD15_SCHEDULER)
    scheduler.set_timesteps(20)
    sigmas = [float(s) for s in scheduler.sigmas]
    if name == "Heun":  # each step's sigma, then the next once more for its second evaluation
        sigmas = sigmas[:1] + sigmas[1:-1:2] + sigmas[-1:]
    assert sigmas == pytest.approx(k_diffusion_sigmas(20, karras="Karras" in name), rel=2e-4, abs=1e-6)
    ddim = make_scheduler("DDIM", SD15_SCHEDULER)
    ddim.set_timesteps(20)
    assert [int(t) for t in ddim.timesteps] == list(range(951, 1, -50))


@pytest.mark.parametrize("name", ["DPM2", "DPM2 Karras", "DPM2 a", "DPM2 a Karras"])
@pytest.mark.parametrize("steps", [1, 2, 8, 20])
def test_dpm2_drops_the_next_to_last_sigma_as_sd_webui(name: str, steps: int) -> None:
    """SD WebUI's DPM2 and DPM2 a (``discard_next_to_last_sigma``): k-diffusion's schedule of one
    step more, less its next-to-last sigma; diffusers' steps over that of ``steps``. Their images
    of a real SD WebUI's checkpoint were 0.7 and 1.6-1.8 of 255 apart, 0.5 after (the issue note).
    Each step but the last is two passes, as diffusers' own."""
    scheduler = make_scheduler(name, SD15_SCHEDULER)
    scheduler.set_timesteps(steps)
    sigmas = [float(s) for s in scheduler.sigmas]
    longer = k_diffusion_sigmas(steps + 1, karras="Karras" in name)
    assert sigmas[:1] + sigmas[1:-1:2] == pytest.approx([*longer[:-2], 0.0], rel=2e-4, abs=1e-6)
    assert len(scheduler.timesteps) == 2 * steps - 1 and scheduler.num_inference_steps == steps
    if "a" in name.split():  # the ancestral step's noise: k-diffusion's get_ancestral_step to the next
        ends = [*longer[:-2], 0.0]
        up = [(b**2 * (a**2 - b**2) / a**2) ** 0.5 for a, b in itertools.pairwise(ends)]
        each = [float(u) for u in scheduler.sigmas_up[:1]] + [float(u) for u in scheduler.sigmas_up[1:-1:2]]
        assert each[:steps] == pytest.approx(up, rel=2e-4, abs=1e-6)  # the last (to 0) adds none


def test_lms_counts_its_order_from_the_calls_first_step() -> None:
    """k-diffusion's LMS (SD WebUI's) raises its order with the steps it has taken, whatever sigma
    it starts at; diffusers' counts from the schedule's start, so an image-to-image call beginning
    at step 5 weighed its one derivative with a fourth-order coefficient (a hires pass 2.0 of 255
    from SD WebUI's images, the issue note). From step 5 the first step is now Euler's, the second
    the two-step one; from step 0 it is diffusers' own, step for step."""

    def step(scheduler: Any, eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = scheduler.timesteps[scheduler.step_index or scheduler.begin_index or 0]
        scheduler.scale_model_input(x, t)  # as a pipeline does before each step
        out: torch.Tensor = scheduler.step(eps, t, x).prev_sample
        return out

    torch.manual_seed(0)
    sample, outputs = torch.randn(1, 4, 8, 8), [torch.randn(1, 4, 8, 8) for _ in range(6)]
    ours = make_scheduler("LMS", SD15_SCHEDULER)
    theirs = diffusers.LMSDiscreteScheduler.from_config(ours.config)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(13)
    assert sampler_name_of(ours) == "LMS"
    x, y = sample, sample
    for eps in outputs:
        x, y = step(ours, eps, x), step(theirs, eps, y)
        assert torch.equal(x, y)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(13)
        scheduler.set_begin_index(5)
    sigmas = ours.sigmas
    first = step(ours, outputs[0], sample)
    assert torch.allclose(first, sample + (sigmas[6] - sigmas[5]) * outputs[0], atol=1e-5)  # Euler's
    assert not torch.allclose(step(theirs, outputs[0], sample), first, atol=1e-3)
    second = step(ours, outputs[1], first)
    s0, s1, s2 = (float(s) for s in sigmas[5:8])
    # the two-point Adams-Bashforth weights over [s1, s2]: k-diffusion's linear_multistep_coeff
    newer = (s2 - s1) * (s2 + s1 - 2 * s0) / (2 * (s1 - s0))
    older = -((s2 - s1) ** 2) / (2 * (s1 - s0))
    assert torch.allclose(second, first + newer * outputs[1] + older * outputs[0], atol=1e-4)


async def test_dpm2_runs_each_kind_of_task(runtime: DiffusersRuntime) -> None:
    """Text-to-image and image-to-image (diffusers' strength over the steps), each sampler."""
    for sampler in ("DPM2", "DPM2 a Karras"):
        made = await runtime.run(job(sampler=sampler, steps=3), no_progress)
        assert made.info["sampler_name"] == sampler.removesuffix(" Karras")
        i2i = job(
            TaskType.IMAGE_TO_IMAGE,
            sampler=sampler,
            steps=4,
            denoising_strength=0.5,
            init_images=[made.images[0]],
        )
        assert size((await runtime.run(i2i, no_progress)).images[0]) == (64, 64)


def test_karras_scheduler_option_and_unknown_sampler() -> None:
    assert sampler_key("DPM++ 2M", "Karras") == "DPM++ 2M Karras"
    assert sampler_key("euler", "karras") == "Euler Karras" and sampler_key("Heun", "Karras") == "Heun Karras"
    assert sampler_key("DPM++ 2M Karras", "Karras") == "DPM++ 2M Karras"
    assert sampler_key("DDIM", "Karras") == "DDIM"  # not k-diffusion: SD WebUI leaves the type unused
    assert sampler_key("Euler", "Automatic") == sampler_key("Euler", "Uniform") == "Euler"
    assert sampler_key(None) is None
    with pytest.raises(Reject, match="Euler a"):
        sampler_key("Warp Drive")
    # what would otherwise run with another schedule than asked, in silence
    with pytest.raises(Reject, match="'Karras' is not available for sampler 'Euler a'") as e:
        sampler_key("Euler a", "Karras")
    assert e.value.code == "unknown_scheduler"
    with pytest.raises(
        Reject, match="unknown schedule type 'Exponential'; known: Automatic, Uniform, Karras"
    ):
        sampler_key("DPM++ 2M", "Exponential")


@pytest.mark.parametrize(
    "sampler",
    [
        *("Euler", "Euler a", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ SDE Karras", "DDIM", "PLMS"),
        *("UniPC", "LMS", "Heun", "PNDM"),
    ],
)
async def test_sampler_smoke(runtime: DiffusersRuntime, sampler: str) -> None:
    result = await runtime.run(job(sampler=sampler), no_progress)
    assert len(result.images) == 1 and result.info["sampler_name"] == sampler.removesuffix(" Karras")


async def test_progress_increases_to_one(runtime: DiffusersRuntime) -> None:
    seen: list[float] = []

    async def progress(value: float) -> None:
        seen.append(value)

    await runtime.run(job(steps=4), progress)
    assert len(seen) >= 4
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert seen[-1] == 1.0 and 0 < seen[0] < 1


async def test_interrupt_mid_run_then_runtime_still_works(runtime: DiffusersRuntime) -> None:
    seen: list[float] = []

    async def progress(value: float) -> None:
        seen.append(value)
        if value >= 0.05:
            await runtime.interrupt()

    with pytest.raises(Interrupted):
        await runtime.run(job(steps=150), progress)
    assert seen and max(seen) < 0.5
    result = await runtime.run(job(), no_progress)
    assert len(result.images) == 1


async def test_cancelled_run_stops_its_thread(runtime: DiffusersRuntime) -> None:
    started = asyncio.Event()

    async def progress(value: float) -> None:
        started.set()

    task = asyncio.create_task(runtime.run(job(steps=150), progress))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    began = time.monotonic()
    assert len((await runtime.run(job(), no_progress)).images) == 1
    assert time.monotonic() - began < 5  # did not wait for the 150 cancelled steps


async def test_unknown_model_is_rejected_with_names(runtime: DiffusersRuntime) -> None:
    with pytest.raises(Reject) as e:
        await runtime.run(job(model="sdxl-base.safetensors"), no_progress)
    assert e.value.code == "unknown_model" and "tiny-b" in e.value.reason


async def test_broken_model_is_a_load_error(runtime: DiffusersRuntime) -> None:
    with pytest.raises(ModelLoadError):
        await runtime.run(job(model="broken"), no_progress)


async def test_no_model_at_all_is_rejected(catalog: ModelCatalog) -> None:
    with pytest.raises(Reject, match="no model"):
        await DiffusersRuntime(catalog, device="cpu").run(job(), no_progress)


async def test_model_switch_through_bounded_lru(catalog: ModelCatalog) -> None:
    rt = DiffusersRuntime(catalog, default_model="tiny-a", device="cpu", cache_size=2)
    await rt.start()
    assert rt.loaded_model == "tiny-a"
    a = await rt.run(job(), no_progress)
    b = await rt.run(job(model="tiny-b.safetensors"), no_progress)  # stem match finds folder tiny-b
    assert rt.loaded_model == "tiny-b" and b.model == "tiny-b" and a.images != b.images
    assert rt.cached_models == ["tiny-a", "tiny-b"]
    await rt.run(job(model="tiny-a"), no_progress)
    assert rt.cached_models == ["tiny-b", "tiny-a"]
    await rt.run(job(model="tiny-a-sf"), no_progress)
    assert rt.cached_models == ["tiny-a", "tiny-a-sf.safetensors"]
    assert rt.loaded_model == "tiny-a-sf.safetensors"
    await rt.aclose()
    assert rt.loaded_model is None and rt.cached_models == []


async def test_single_file_gives_same_images_as_folder(runtime: DiffusersRuntime) -> None:
    folder = await runtime.run(job(model="tiny-a", seed=9), no_progress)
    single = await runtime.run(job(model="tiny-a-sf.safetensors", seed=9), no_progress)
    assert single.model == "tiny-a-sf.safetensors"
    assert single.info["note"] == folder.info["note"]
    assert (
        Image.open(io.BytesIO(single.images[0])).tobytes()
        == Image.open(io.BytesIO(folder.images[0])).tobytes()
    )


def test_build_runtime(catalog: ModelCatalog, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = build_runtime(
        "diffusers", catalog=catalog, options={"device": "cpu"}, default_model="tiny-b", cache_size=3
    )
    assert isinstance(rt, DiffusersRuntime)
    assert (rt.name, rt.default_model, rt.cache_size, rt.device) == ("diffusers", "tiny-b", 3, "cpu")
    with pytest.raises(ConfigError, match="diffusers, synthetic"):
        build_runtime("nope", catalog=catalog, options={})
    monkeypatch.setitem(RUNTIMES, "needs-extra", ("torchvision", "Missing", "diffusers"))
    with pytest.raises(ConfigError, match=r"pip install 'sdfleet\[diffusers\]'"):
        build_runtime("needs-extra", catalog=catalog, options={})
