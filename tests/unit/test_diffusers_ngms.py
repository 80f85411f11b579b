"""SD WebUI's negative guidance minimum sigma (``s_min_uncond``, NGMS) and Skip Early CFG
(``skip_early_cond``) in the diffusers runtime, on tiny random-weight models (CPU, 64x64). Both
were refused (``unsupported_option``).

What follows from SD WebUI's rule (``sdfleet.ngms``), each held here: a pass that skips is the
prompt's prediction alone, so skipping every pass is the image of CFG scale 1 (text-to-image,
SDXL's added conditioning, an inpainting UNet's masked task, both passes of a hires fix); without
``s_min_uncond_all`` only odd passes below the level skip, read as SD WebUI's samplers read it
(Heun's and DPM2's second evaluations, DDIM's timestep); a level no pass is below is the plain
image without a word; batch-mates keep their images. Skip Early CFG: the passes whose index over
SD WebUI's ``total_steps`` is at most the option, before NGMS is asked; each pass of a hires fix
counted anew. The images against SD WebUI's own:
``tests/interop/test_sdwebui_weights_interop.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel
from test_diffusers_batching import pixels, quiet
from test_diffusers_variation import a_mask, an_input
from test_inpainting_batched import batching

from sdfleet.errors import Reject
from sdfleet.runtimes import _diffusers_ngms as G
from sdfleet.runtimes._diffusers_pipes import make_scheduler
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.runtimes.unsupported import refuse
from sdfleet.tasks import TaskParams, TaskType

I2I = TaskType.IMAGE_TO_IMAGE
EVERY = {"override_settings": {"s_min_uncond_all": True}}


def early(share: float, **more: object) -> dict[str, object]:
    return {"override_settings": {"skip_early_cond": share, **more}}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    return batching(tmp_path_factory.mktemp("models"))


def job(kind: TaskType = TaskType.TEXT_TO_IMAGE, task_id: str = "t-1", **fields: object) -> Job:
    base: dict[str, object] = {
        "prompt": "a red cat",
        "negative_prompt": "blurry",
        "steps": 4,
        "width": 64,
        "height": 64,
        "seed": 1,
        "cfg_scale": 7.0,
        "sampler": "Euler",
    }
    named = ("s_min_uncond", "override", "enable_hr", "hr_", "mask", "inpaint", "eta", "refiner")
    extra = {k: fields.pop(k) for k in list(fields) if k.startswith(named)}
    mask = extra.pop("mask", None)
    if mask is not None:
        extra["mask"] = "m"
    base |= fields | {"extra": extra}
    init = base.pop("init_images", [])
    assert isinstance(init, list)
    return Job(task_id, kind, "tiny-a", TaskParams.model_validate(base), init_images=init, mask=mask)  # type: ignore[arg-type]


def same(a: RuntimeResult, b: RuntimeResult) -> bool:
    """Equal to the last bit a smaller batch through the UNet may round differently."""
    return all(int(abs(pixels(x) - pixels(y)).max()) <= 1 for x, y in zip(a.images, b.images, strict=True))


async def batched_as_alone(runtime: DiffusersRuntime, jobs: list[Job]) -> None:
    """Each of ``jobs`` run in one batch makes its images and words as when it runs alone."""
    batched = await runtime.run_batch(jobs, [quiet] * len(jobs))
    for one, outcome in zip(jobs, batched, strict=True):
        assert isinstance(outcome, RuntimeResult)
        alone = await runtime.run(one, quiet)
        assert same(outcome, alone) and outcome.info["infotexts"] == alone.info["infotexts"]


def refused(**fields: object) -> Reject:
    """Why a text-to-image task of ``fields`` is refused at the door of a diffusers queue."""
    with pytest.raises(Reject) as e:
        refuse("diffusers", TaskType.TEXT_TO_IMAGE, job(**fields).params)
    return e.value


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, float | None]]:
    """Each pass through the (real) UNet: its rows, and the level ``G.level`` read for it."""
    seen: list[tuple[int, float | None]] = []
    levels: list[float] = []  # read for the pass about to run
    real_level, real_forward = G.level, UNet2DConditionModel.forward

    def level(scheduler: Any, timestep: Any) -> float:
        levels.append(real_level(scheduler, timestep))
        return levels[-1]

    def forward(self: UNet2DConditionModel, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append((sample.shape[0], levels.pop() if levels else None))
        return real_forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(G, "level", level)
    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    return seen


async def test_skipping_every_pass_is_the_image_of_cfg_scale_one(runtime: DiffusersRuntime) -> None:
    every = await runtime.run(job(s_min_uncond=1000.0, **EVERY), quiet)
    unguided = await runtime.run(job(cfg_scale=1.0), quiet)
    guided = await runtime.run(job(), quiet)
    assert same(every, unguided) and not same(every, guided)
    text = every.info["infotexts"][0]
    assert text.endswith("Model: tiny-a, NGMS: 1000.0, NGMS all steps: True, Version: sdfleet-0.1.0"), text
    # image-to-image, and an inpainting task on the same model
    i2i = {"init_images": [an_input()], "denoising_strength": 0.6}
    every = await runtime.run(job(I2I, s_min_uncond=50, **EVERY, **i2i), quiet)
    assert same(every, await runtime.run(job(I2I, cfg_scale=1.0, **i2i), quiet))
    assert "Denoising strength: 0.6, NGMS: 50.0, NGMS all steps: True" in every.info["infotexts"][0]
    masked = {"mask": a_mask(), **i2i}
    every = await runtime.run(job(I2I, s_min_uncond=50, **EVERY, **masked), quiet)
    assert same(every, await runtime.run(job(I2I, cfg_scale=1.0, **masked), quiet))


async def test_both_passes_of_a_hires_fix_skip(runtime: DiffusersRuntime) -> None:
    hr = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6}
    every = await runtime.run(job(s_min_uncond=1000.0, **EVERY, **hr), quiet)
    assert same(every, await runtime.run(job(cfg_scale=1.0, **hr), quiet))
    assert "NGMS: 1000.0, NGMS all steps: True, Version" in every.info["infotexts"][0]


@pytest.mark.parametrize("kind", ["sdxl", "inpainting"])
async def test_other_unets_conditioning_is_cut_to_the_prompts_rows(
    tmp_path: Path, kind: str, passes: list[tuple[int, float | None]]
) -> None:
    """SDXL's added conditioning (time ids, pooled text) and an inpainting UNet's masked input
    lose the negative prompt's rows with the latents."""
    runtime = batching(tmp_path, sdxl=kind == "sdxl", inpainting_unet=kind == "inpainting")
    what: dict[str, Any] = {"mask": a_mask(), "init_images": [an_input()], "denoising_strength": 0.75}
    kind_of = I2I if kind == "inpainting" else TaskType.TEXT_TO_IMAGE
    fields = what if kind == "inpainting" else {}
    every = await runtime.run(job(kind_of, s_min_uncond=1000.0, **EVERY, **fields), quiet)
    assert {rows for rows, _ in passes} == {1}
    assert same(every, await runtime.run(job(kind_of, cfg_scale=1.0, **fields), quiet))


def model_scheduler(runtime: DiffusersRuntime) -> Any:
    loaded = runtime._cache.get("tiny-a")
    assert loaded is not None
    return loaded.pipe.scheduler


def euler_sigmas(runtime: DiffusersRuntime, steps: int) -> list[float]:
    """The k-diffusion schedule of ``steps`` as SD WebUI's Euler, Heun and DPM2 share it."""
    scheduler = make_scheduler("Euler", model_scheduler(runtime).config)
    scheduler.set_timesteps(steps)
    return [float(s) for s in scheduler.sigmas]


async def test_odd_passes_below_the_level_skip(
    runtime: DiffusersRuntime, passes: list[tuple[int, float | None]]
) -> None:
    """Every other pass, from the second, where its sigma is below ``s_min_uncond``."""
    await runtime.run(job(), quiet)  # the model loaded
    passes.clear()
    sigmas = euler_sigmas(runtime, 6)
    below = (sigmas[1] + sigmas[3]) / 2  # pass 1 is above it, passes 2 to 5 below
    made = await runtime.run(job(steps=6, s_min_uncond=below), quiet)
    assert passes == [(rows, sigma) for rows, sigma in zip([2, 2, 2, 1, 2, 1], sigmas, strict=False)]
    assert f"NGMS: {below}, Version" in made.info["infotexts"][0]
    passes.clear()
    odd = await runtime.run(job(steps=6, s_min_uncond=(sigmas[0] + sigmas[1]) / 2), quiet)
    assert [rows for rows, _ in passes] == [2, 1] * 3
    assert not same(odd, await runtime.run(job(steps=6), quiet))  # the late passes move the tiny model little
    passes.clear()
    none = await runtime.run(job(steps=6, s_min_uncond=sigmas[5] / 2), quiet)  # no pass below it
    assert [rows for rows, _ in passes] == [2] * 6
    plain = await runtime.run(job(steps=6), quiet)
    assert none.images == plain.images and none.info["infotexts"] == plain.info["infotexts"]


@pytest.mark.parametrize("sampler", ["Heun", "DPM2", "DPM++ SDE", "DDIM"])
async def test_the_level_of_each_pass_is_sd_webuis(
    runtime: DiffusersRuntime, passes: list[tuple[int, float | None]], sampler: str
) -> None:
    """k-diffusion's Heun evaluates at each sigma and again at the next (the last step once),
    DPM2 and DPM++ SDE the second time at their geometric mean (DPM2 on its own sigmas:
    ``_diffusers_dpm2``); SD WebUI's DDIM passes its timestep."""
    await runtime.run(job(), quiet)
    passes.clear()
    await runtime.run(job(sampler=sampler, steps=3, s_min_uncond=0.01), quiet)
    s = euler_sigmas(runtime, 3)
    if sampler == "DPM2":  # SD WebUI's DPM2 steps over the schedule of 4 less its next-to-last sigma
        s = [*euler_sigmas(runtime, 4)[:-2], 0.0]
    if sampler == "Heun":
        expected = [s[0], s[1], s[1], s[2], s[2]]
    elif sampler in ("DPM2", "DPM++ SDE"):
        mid = [float(torch.tensor(s[i] * s[i + 1]).sqrt()) for i in range(2)]
        expected = [s[0], mid[0], s[1], mid[1], s[2]]
    else:
        ddim = make_scheduler("DDIM", model_scheduler(runtime).config)
        ddim.set_timesteps(3)
        expected = [float(t) for t in ddim.timesteps]
    assert [level for _, level in passes] == pytest.approx(expected, rel=1e-5)


async def test_batch_mates_keep_their_images(runtime: DiffusersRuntime) -> None:
    jobs = [job(task_id="t-1", seed=3, s_min_uncond=5.0), job(task_id="t-2", seed=4, s_min_uncond=5.0)]
    assert runtime.batch_key(jobs[0]) == runtime.batch_key(jobs[1]) is not None
    assert runtime.batch_key(job(s_min_uncond=6.0)) != runtime.batch_key(jobs[0])
    assert runtime.batch_key(job(s_min_uncond=5.0, **EVERY)) != runtime.batch_key(jobs[0])
    assert runtime.batch_key(job()) != runtime.batch_key(jobs[0])
    await batched_as_alone(runtime, jobs)


def test_what_does_not_run_with_it_is_refused_by_name() -> None:
    e = refused(s_min_uncond=2, refiner_checkpoint="tiny-b")
    assert e.code == "unsupported_option" and "s_min_uncond=2 with refiner_checkpoint" in e.reason
    e = refused(s_min_uncond=2, prompt="a cat AND a dog")
    assert e.code == "unsupported_option" and "s_min_uncond=2 with AND in a prompt" in e.reason
    hr = {"enable_hr": True, "hr_scale": 2, "hr_prompt": "a AND b"}
    assert "s_min_uncond=2 with AND" in refused(s_min_uncond=2, **hr).reason
    for bad in ("2", float("inf"), True, [1]):
        e = refused(s_min_uncond=bad)
        assert e.code == "invalid_params" and "s_min_uncond must be a number" in e.reason
    e = refused(s_min_uncond=1, override_settings={"s_min_uncond_all": "yes"})
    assert e.code == "invalid_params" and "s_min_uncond_all must be true or false" in e.reason
    for off in (0, -1.5, None):  # SD WebUI skips nothing at 0 or less
        refuse("diffusers", TaskType.TEXT_TO_IMAGE, job(s_min_uncond=off, refiner_checkpoint="tiny-b").params)


async def test_skip_early_cfg_skips_the_first_share_of_the_passes(
    runtime: DiffusersRuntime, passes: list[tuple[int, float | None]]
) -> None:
    """SD WebUI's ``pass / total_steps <= skip_early_cond``: 0, 1, 2, 3 of 6 at 0.5."""
    await runtime.run(job(), quiet)
    passes.clear()
    made = await runtime.run(job(steps=6, **early(0.5)), quiet)
    assert [rows for rows, _ in passes] == [1, 1, 1, 1, 2, 2]
    assert made.info["infotexts"][0].endswith("Skip Early CFG: 0.5, Version: sdfleet-0.1.0")
    assert made.info["negative_skips"] == [{"Skip Early CFG": 0.5}, {}]
    assert not same(made, await runtime.run(job(steps=6), quiet))
    passes.clear()
    await runtime.run(job(steps=6, **early(0.01)), quiet)  # the first pass at any share above 0
    assert [rows for rows, _ in passes] == [1, 2, 2, 2, 2, 2]
    passes.clear()  # Heun: 5 passes of SD WebUI's total_steps 6 (its last step one pass)
    await runtime.run(job(sampler="Heun", steps=3, **early(0.5)), quiet)
    assert [rows for rows, _ in passes] == [1, 1, 1, 1, 2]
    for off in (0, -0.5):  # SD WebUI skips nothing at 0, nor below it (no pass's share is)
        passes.clear()
        plain = await runtime.run(job(steps=6), quiet)
        none = await runtime.run(job(steps=6, **early(off)), quiet)
        assert [rows for rows, _ in passes] == [2] * 12
        assert none.images == plain.images and none.info["infotexts"] == plain.info["infotexts"]


async def test_skip_early_cfg_comes_first_and_ngms_asks_of_the_passes_it_leaves(
    runtime: DiffusersRuntime, passes: list[tuple[int, float | None]]
) -> None:
    await runtime.run(job(), quiet)
    passes.clear()
    made = await runtime.run(job(steps=6, s_min_uncond=1000.0, **early(0.34)), quiet)
    assert [rows for rows, _ in passes] == [1, 1, 1, 1, 2, 1]  # early: 0, 1, 2; NGMS: 3, 5
    text = made.info["infotexts"][0]
    assert text.endswith("Skip Early CFG: 0.34, NGMS: 1000.0, Version: sdfleet-0.1.0"), text


async def test_skip_early_cfg_at_one_is_the_image_of_cfg_scale_one(runtime: DiffusersRuntime) -> None:
    """Every pass (a share of 1 or more), both passes of a hires fix, image-to-image; the option
    said as given (SD WebUI says an integer as one)."""
    every = await runtime.run(job(**early(1)), quiet)
    assert same(every, await runtime.run(job(cfg_scale=1.0), quiet))
    assert every.info["infotexts"][0].endswith("Skip Early CFG: 1, Version: sdfleet-0.1.0")
    hr = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6}
    every = await runtime.run(job(**early(1.5), **hr), quiet)
    assert same(every, await runtime.run(job(cfg_scale=1.0, **hr), quiet))
    assert every.info["negative_skips"] == [{"Skip Early CFG": 1.5}] * 2
    i2i = {"init_images": [an_input()], "denoising_strength": 0.6}
    every = await runtime.run(job(I2I, **early(1.0), **i2i), quiet)
    assert same(every, await runtime.run(job(I2I, cfg_scale=1.0, **i2i), quiet))


async def test_each_sampling_counts_its_own_share(
    runtime: DiffusersRuntime, passes: list[tuple[int, float | None]]
) -> None:
    """SD WebUI's ``total_steps`` is the passes its sampling makes: a hires fix's second pass makes
    its steps (4, the first's: ``img2img_fix_steps`` for a pass given its steps) and counts anew;
    image-to-image at denoising strength 0.6 makes ``t_enc + 1`` = 3 of 4."""
    hr = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6}
    await runtime.run(job(), quiet)
    passes.clear()
    await runtime.run(job(**early(0.5), **hr), quiet)
    assert [rows for rows, _ in passes] == [1, 1, 1, 2] * 2  # each sampling its own
    passes.clear()
    await runtime.run(job(I2I, init_images=[an_input()], denoising_strength=0.6, **early(0.5)), quiet)
    assert [rows for rows, _ in passes] == [1, 1, 2]


async def test_skip_early_cfg_batches_with_the_same_share_only(runtime: DiffusersRuntime) -> None:
    jobs = [job(task_id="t-1", seed=3, **early(0.5)), job(task_id="t-2", seed=4, **early(0.5))]
    assert runtime.batch_key(jobs[0]) == runtime.batch_key(jobs[1]) is not None
    assert runtime.batch_key(job(**early(0.25))) != runtime.batch_key(jobs[0])
    assert runtime.batch_key(job(**early(1))) != runtime.batch_key(job(**early(1.0)))  # said apart
    assert runtime.batch_key(job()) != runtime.batch_key(jobs[0])
    await batched_as_alone(runtime, jobs)


def test_skip_early_cfg_where_it_does_not_run_is_refused_by_name() -> None:
    e = refused(refiner_checkpoint="tiny-b", **early(0.5))
    assert e.code == "unsupported_option" and "skip_early_cond=0.5 with refiner_checkpoint" in e.reason
    e = refused(prompt="a cat AND a dog", **early(0.5))
    assert e.code == "unsupported_option" and "skip_early_cond=0.5 with AND in a prompt" in e.reason
    for bad in ("0.5", float("nan"), False, {"a": 1}):
        e = refused(**early(bad))  # type: ignore[arg-type]
        assert e.code == "invalid_params", e.reason
        assert "override_settings.skip_early_cond must be a number" in e.reason, e.reason
    for off in (0, -1):
        refuse("diffusers", TaskType.TEXT_TO_IMAGE, job(refiner_checkpoint="tiny-b", **early(off)).params)
