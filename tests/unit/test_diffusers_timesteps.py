"""DDIM, PLMS and UniPC step as SD WebUI 1.10's (``_diffusers_timesteps``, ``_diffusers_unipc``):
each scheduler, driven as a diffusers pipeline drives it, against SD WebUI's own sampling functions
(``ddim``, ``plms`` of ``sd_samplers_timesteps_impl``, ``uni_pc.UniPC.sample`` at its options'
defaults, and ``sample_img2img``'s noising), written out below, with one model standing in for the
UNet."""

from __future__ import annotations

from typing import Any

import diffusers
import pytest
import torch
from test_diffusers_runtime import SD15_SCHEDULER as SD15

from sdfleet.runtimes._diffusers_info import sampler_name_of
from sdfleet.runtimes._diffusers_pipes import make_scheduler
from sdfleet.runtimes._diffusers_samplers import (
    clipped_timesteps,
    hires_schedule,
    img2img_schedule,
    sd_webui_timesteps,
)

SD15_SCHEDULER = {**SD15, "set_alpha_to_one": False, "clip_sample": False, "skip_prk_steps": True}
"""SD 1.5's own scheduler config, as its model folder gives it (DDIM's and PLMS's keys too)."""


def model(x: torch.Tensor, t: float) -> torch.Tensor:
    """A stand-in for the UNet's noise prediction that depends on both its input and its timestep."""
    return 0.3 * x * (1 - t / 1000) + 0.1 * torch.sin(x + t / 100)


def alphas() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def their_ddim(x: torch.Tensor, timesteps: list[int]) -> tuple[torch.Tensor, list[int]]:
    """SD WebUI 1.10.1's ``ddim`` at eta 0; and the timesteps it evaluated the model at."""
    a = alphas()
    at, prev = a[timesteps], a[[0, *timesteps[:-1]]]
    seen = []
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        seen.append(timesteps[index])
        e_t = model(x, timesteps[index]).double()
        pred_x0 = (x - (1 - at[index]).sqrt() * e_t) / at[index].sqrt()
        x = (prev[index].sqrt() * pred_x0 + (1.0 - prev[index]).sqrt() * e_t).float()
    return x, seen


def their_plms(x: torch.Tensor, timesteps: list[int]) -> tuple[torch.Tensor, list[int]]:
    """SD WebUI 1.10.1's ``plms``; and the timesteps it evaluated the model at."""
    a = alphas()
    at, prev = a[timesteps], a[[0, *timesteps[:-1]]]
    seen: list[int] = []
    old: list[torch.Tensor] = []

    def prev_of(x: torch.Tensor, e_t: torch.Tensor, index: int) -> torch.Tensor:
        pred_x0 = (x - (1 - at[index]).sqrt() * e_t) / at[index].sqrt()
        return (prev[index].sqrt() * pred_x0 + (1.0 - prev[index]).sqrt() * e_t).float()

    def evaluate(x: torch.Tensor, t: int) -> torch.Tensor:
        seen.append(t)
        return model(x, t).double()

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = evaluate(x, timesteps[index])
        if not old:
            e_prime = (e_t + evaluate(prev_of(x, e_t, index), timesteps[max(index - 1, 0)])) / 2
        elif len(old) == 1:
            e_prime = (3 * e_t - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = prev_of(x, e_prime, index)
        old = [*old, e_t][-3:]
    return x, seen


def ours(scheduler: Any, x: torch.Tensor, timesteps: Any) -> tuple[torch.Tensor, list[int]]:
    """A diffusers pipeline's loop over ``timesteps``."""
    seen = []
    for t in timesteps:
        seen.append(int(t))
        x = scheduler.step(model(x, int(t)), t, x).prev_sample
    return x, seen


def begun(scheduler: Any, steps: int, strength: float) -> Any:
    """diffusers' image-to-image ``get_timesteps``: the timesteps the call runs."""
    start = max(steps - min(int(steps * strength), steps), 0)
    scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def own_of(scheduler: Any) -> Any:
    """diffusers' own scheduler of the kind ``scheduler`` is (sdfleet's are subclasses), its config."""
    own = next(kind for kind in type(scheduler).__mro__ if kind.__module__.startswith("diffusers."))
    return own.from_config(scheduler.config)


def timesteps_of(steps: int) -> list[int]:
    timesteps = sd_webui_timesteps(steps)
    assert timesteps is not None
    return timesteps


@pytest.mark.parametrize("steps", [4, 8, 15, 20, 30, 150])
@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
def test_text_to_image_steps_as_sd_webuis(sampler: str, steps: int) -> None:
    """From the same noise, each model evaluation and the sample are SD WebUI's, where diffusers'
    evaluated ``steps`` timesteps from 1 (at 15 steps SD WebUI's are 16 from 991, diffusers' 15
    from 925: its images 5.2 of 255 from SD WebUI's, 0.000 after; the issue note)."""
    scheduler = make_scheduler(sampler, SD15_SCHEDULER)
    assert sampler_name_of(scheduler) == sampler
    scheduler.set_timesteps(steps)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    theirs, their_calls = (their_ddim if sampler == "DDIM" else their_plms)(noise, timesteps_of(steps))
    mine, my_calls = ours(scheduler, noise, scheduler.timesteps)
    assert my_calls == their_calls
    assert torch.allclose(mine, theirs, atol=1e-4)
    assert scheduler.sd_webui_total_steps == steps  # SD WebUI's total_steps: skip early CFG's
    own = own_of(scheduler)
    own.set_timesteps(steps)
    if 1000 % (1000 // steps):  # diffusers' own schedule is another here
        assert not torch.allclose(ours(own, noise, own.timesteps)[0], theirs, atol=1e-2)


@pytest.mark.parametrize("steps", [1, 2, 3, 9, 27, 36, 37, 105, 300])
@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
def test_where_diffusers_cannot_step_as_sd_webui_its_own_schedule_runs(sampler: str, steps: int) -> None:
    """SD WebUI's last timestep is 1000 clipped to 999 at these steps (its first step one timestep
    shorter than the others), or it evaluates the model once or never (1, 2 steps): diffusers' step
    cannot follow it (PLMS's indexed past the model's last timestep), so diffusers' own runs."""
    assert sd_webui_timesteps(steps) is None
    scheduler = make_scheduler(sampler, SD15_SCHEDULER)
    own = own_of(scheduler)
    scheduler.set_timesteps(steps)
    own.set_timesteps(steps)
    assert torch.equal(scheduler.timesteps, own.timesteps)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    assert torch.equal(ours(scheduler, noise, scheduler.timesteps)[0], ours(own, noise, own.timesteps)[0])
    if len(own.timesteps) > 1:  # an image-to-image call's start: diffusers' timesteps and noise
        scheduler.set_begin_index(1)
        assert torch.equal(scheduler.timesteps, own.timesteps)
        start = own.timesteps[1:2]
        assert torch.equal(scheduler.add_noise(noise, noise, start), own.add_noise(noise, noise, start))
    for d in (0.3, 0.6, 1.0):
        assert img2img_schedule(sampler, steps, d) == img2img_schedule(None, steps, d)


@pytest.mark.parametrize("steps", [4, 8, 15, 30, 60])
@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
def test_image_to_image_noises_and_steps_as_sd_webuis(sampler: str, steps: int) -> None:
    """SD WebUI's image-to-image noises its input to ``timesteps[t_enc]`` and evaluates from the
    one below (DDIM ``t_enc - 1`` evaluations, PLMS one more: its first step's two); the strength
    handed to diffusers starts its call there and the scheduler noises one timestep above it (DDIM
    at 8 steps, 0.6: 3.1 of 255 apart, 0.000 after; PLMS, whose call kept diffusers' own, 2.1).
    Where SD WebUI evaluates nothing (it answers the noised input), or diffusers' slicing of the
    call's steps cannot start where SD WebUI's does (a few evaluations of many steps), the call
    keeps diffusers' strength."""
    a = alphas()
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    theirs_of = their_ddim if sampler == "DDIM" else their_plms
    kept, ran = [], []
    for d in (k / 20 for k in range(1, 21)):
        n, strength = img2img_schedule(sampler, steps, d)
        t_enc = int(min(d, 0.999) * steps)
        timesteps = timesteps_of(steps)
        if t_enc < 2 or len(timesteps) - t_enc > steps - 1:  # diffusers skips at most steps - 1
            assert (n, strength) == img2img_schedule(None, steps, d)
            kept.append(d)
            continue
        level = a[timesteps[t_enc]]
        theirs, their_calls = theirs_of(
            (image * level.sqrt() + noise * (1 - level).sqrt()).float(), timesteps[:t_enc]
        )
        scheduler = make_scheduler(sampler, SD15_SCHEDULER)
        scheduler.set_timesteps(n)
        run = begun(scheduler, n, strength)
        started = scheduler.add_noise(image, noise, run[:1])
        mine, my_calls = ours(scheduler, started, run)
        assert my_calls == their_calls, (steps, d)
        assert scheduler.sd_webui_total_steps == t_enc + 1  # launch_sampling(t_enc + 1)
        assert torch.allclose(mine, theirs, atol=1e-4), (steps, d)
        ran.append(d)
    assert ran and (not kept or max(kept) < min(ran))  # the lowest strengths only


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
def test_a_hires_pass_runs_sd_webuis_schedule(sampler: str) -> None:
    """A hires pass of ``n`` steps at ``d``: SD WebUI's image-to-image given the steps, over a
    schedule ``int(n / min(d, 0.999))`` long from its ``n - 1``-th timestep (DDIM ``n - 2``
    evaluations, PLMS ``n - 1``); the second pass here starts at the same, noised one timestep
    above (a Latent pass was 2.7 of 255 from SD WebUI's with DDIM, 4.0 with PLMS)."""
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    theirs_of = their_ddim if sampler == "DDIM" else their_plms
    for steps in (4, 8, 20):
        for d in (0.3, 0.6, 0.95):
            schedule, strength = hires_schedule(sampler, steps, d)
            assert schedule == int(steps / min(d, 0.999))
            scheduler = make_scheduler(sampler, SD15_SCHEDULER)
            scheduler.set_timesteps(schedule)
            run = begun(scheduler, schedule, strength)
            timesteps = timesteps_of(schedule)
            level = alphas()[timesteps[steps - 1]]
            theirs, their_calls = theirs_of((image * level.sqrt()).float(), timesteps[: steps - 1])
            mine, my_calls = ours(
                scheduler, scheduler.add_noise(image, torch.zeros_like(image), run[:1]), run
            )
            assert my_calls == their_calls, (steps, d)
            assert scheduler.sd_webui_total_steps == steps
            assert torch.allclose(mine, theirs, atol=1e-4), (steps, d)


def test_plms_whole_schedule_takes_its_first_step_twice() -> None:
    """diffusers' PLMS arrangement: its first step's second evaluation at the second timestep, then
    that timestep again for the next step (SD WebUI's "pseudo improved Euler")."""
    whole = make_scheduler("PLMS", SD15_SCHEDULER)
    whole.set_timesteps(15)
    assert [int(t) for t in whole.timesteps[:4]] == [991, 925, 925, 859]


def their_unipc(x: torch.Tensor, steps: int, start: int | None = None) -> tuple[torch.Tensor, list[float]]:
    """SD WebUI 1.10.1's UniPC (``uni_pc.UniPC.sample``: multistep, order 3, variant bh1, predicting
    x0, the lower order at the end; ``NoiseScheduleVP('discrete')``'s log alphas interpolated in
    time) from time 1, or from the model's timestep ``start`` (its image-to-image); and the model
    times it evaluated at."""
    grid, log_alphas = torch.linspace(0.0, 1.0, 1001)[1:], 0.5 * torch.log(alphas().float())

    def log_alpha(t: torch.Tensor) -> torch.Tensor:
        k = int(torch.searchsorted(grid, t).clamp(1, 999))
        return log_alphas[k - 1] + (t - grid[k - 1]) * (log_alphas[k] - log_alphas[k - 1]) / (
            grid[k] - grid[k - 1]
        )

    def alpha(t: torch.Tensor) -> torch.Tensor:
        return torch.exp(log_alpha(t))

    def std(t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * log_alpha(t)))

    def lam(t: torch.Tensor) -> torch.Tensor:
        return log_alpha(t) - torch.log(std(t))

    seen: list[float] = []

    def data(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = (t - 1.0 / 1000) * 1000.0
        seen.append(float(time))
        return (x - std(t) * model(x, time)) / alpha(t)

    first = torch.tensor(1.0) if start is None else torch.tensor(start) / 1000 + 1 / 1000
    times = torch.linspace(float(first), 1 / 1000, steps + 1)
    models, ts = [data(x, times[0])], [times[0]]
    for k in range(1, steps + 1):
        order, t = min(3, k, steps + 1 - k), times[k]
        h = lam(t) - lam(ts[-1])
        rks = [float((lam(ts[-(i + 1)]) - lam(ts[-1])) / h) for i in range(1, order)] + [1.0]
        d1s = [(models[-(i + 1)] - models[-1]) / rks[i - 1] for i in range(1, order)]
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k, factorial, rows, b = h_phi_1 / hh - 1, 1, [], []
        for i in range(1, order + 1):
            rows.append(torch.tensor(rks) ** (i - 1))
            b.append(float(h_phi_k * factorial / hh))  # B(h) = h for bh1
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r, bs = torch.stack(rows), torch.tensor(b)
        x_t_ = std(t) / std(ts[-1]) * x - alpha(t) * h_phi_1 * models[-1]
        x_t = x_t_
        if d1s:
            rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(r[:-1, :-1], bs[:-1])
            x_t = x_t_ - alpha(t) * hh * sum(p * d for p, d in zip(rhos_p, d1s, strict=True))
        if k < steps:  # the corrector, and the model at the new point (none after the last)
            rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(r, bs)
            model_t = data(x_t, t)
            corr = sum((c * d for c, d in zip(rhos_c[:-1], d1s, strict=True)), torch.zeros_like(x))
            x_t = x_t_ - alpha(t) * hh * (corr + rhos_c[-1] * (model_t - models[-1]))
            models.append(model_t)
        x = x_t
        ts.append(t)
    return x, seen


def unipc_run(scheduler: Any, x: torch.Tensor, timesteps: Any) -> tuple[torch.Tensor, list[float]]:
    """A diffusers pipeline's loop over ``timesteps``, the model given each as it is (not rounded)."""
    seen = []
    for t in timesteps:
        seen.append(float(t))
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x, seen


@pytest.mark.parametrize("steps", [3, 4, 8, 9, 15, 20, 30, 150])
def test_unipc_text_to_image_steps_as_sd_webuis(steps: int) -> None:
    """SD WebUI's UniPC is its own implementation at its options' defaults (diffusers' at its
    defaults, order 2, bh2, over the model's ``leading`` schedule: 9.0 of 255 apart at 8 steps),
    over as many time-uniform steps as its DDIM timesteps (16 for 15 steps, where 15 were 0.25
    apart), whose model times are not rounded: the same model times and sample here."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    theirs, their_times = their_unipc(noise, len(clipped_timesteps(steps)))  # unipc(timesteps=...)
    scheduler = make_scheduler("UniPC", SD15_SCHEDULER)
    scheduler.set_timesteps(steps)
    mine, my_times = unipc_run(scheduler, noise, scheduler.timesteps)
    assert my_times == their_times
    assert scheduler.sd_webui_total_steps == steps  # launch_sampling(steps), whatever it runs
    assert torch.allclose(mine, theirs, atol=1e-4)
    if steps == 15:  # SD WebUI's 16 timesteps: 16 steps, 999 - 62.4375 each (not rounded)
        assert len(my_times) == 16 and my_times[1] == pytest.approx(936.5625)


@pytest.mark.parametrize("steps", [4, 8, 9, 15, 20, 30, 60])
def test_unipc_image_to_image_noises_and_steps_as_sd_webuis(steps: int) -> None:
    """SD WebUI's image-to-image noises its input to ``timesteps[t_enc]`` of its DDIM timesteps and
    runs ``t_enc`` steps time-uniform from the one below to the end: not the tail of a whole
    schedule (3.7 of 255 apart at 8 steps, 0.6, when diffusers' tail ran). The strength handed to
    diffusers leaves ``t_enc`` steps, and the scheduler writes SD WebUI's into them when the
    pipeline says where the call starts; below UniPC's order (SD WebUI refuses that), or where
    diffusers' slicing cannot leave ``t_enc`` steps (a few of many), diffusers' strength."""
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ran = 0
    for d in (k / 20 for k in range(1, 21)):
        n, strength = img2img_schedule("UniPC", steps, d)
        t_enc = int(min(d, 0.999) * steps)
        timesteps = clipped_timesteps(steps)
        if t_enc < 3 or not 1 <= len(timesteps) - t_enc <= steps - 1:  # diffusers skips 1 to n - 1
            assert (n, strength) == img2img_schedule(None, steps, d), (steps, d)
            continue
        level = alphas()[timesteps[t_enc]]
        theirs, their_times = their_unipc(
            (image * level.sqrt() + noise * (1 - level).sqrt()).float(), t_enc, timesteps[t_enc - 1]
        )
        scheduler = make_scheduler("UniPC", SD15_SCHEDULER)
        scheduler.set_timesteps(n)
        run = begun(scheduler, n, strength)
        mine, my_times = unipc_run(scheduler, scheduler.add_noise(image, noise, run[:1]), run)
        assert my_times == their_times, (steps, d)
        assert scheduler.sd_webui_total_steps == t_enc + 1  # launch_sampling(t_enc + 1)
        assert torch.allclose(mine, theirs, atol=1e-4), (steps, d)
        ran += 1
    assert ran


def test_a_unipc_hires_pass_runs_sd_webuis_schedule() -> None:
    """A hires pass of ``n`` steps at ``d``: SD WebUI's image-to-image given the steps, ``n - 1`` of
    them from the ``n - 1``-th timestep of a schedule ``int(n / min(d, 0.999))`` long (2.7 of 255
    apart as diffusers' tail, Latent ×1.5 at 8 steps); fewer than UniPC's order: diffusers'."""
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for steps in (4, 8, 20):
        for d in (0.3, 0.6, 0.95):
            schedule, strength = hires_schedule("UniPC", steps, d)
            assert schedule == int(steps / min(d, 0.999))
            scheduler = make_scheduler("UniPC", SD15_SCHEDULER)
            scheduler.set_timesteps(schedule)
            run = begun(scheduler, schedule, strength)
            timesteps = clipped_timesteps(schedule)
            level = alphas()[timesteps[steps - 1]]
            theirs, their_times = their_unipc((image * level.sqrt()).float(), steps - 1, timesteps[steps - 2])
            mine, my_times = unipc_run(
                scheduler, scheduler.add_noise(image, torch.zeros_like(image), run[:1]), run
            )
            assert my_times == their_times, (steps, d)
            assert torch.allclose(mine, theirs, atol=1e-4), (steps, d)
    assert hires_schedule("UniPC", 3, 0.6) == hires_schedule(None, 3, 0.6)


@pytest.mark.parametrize("sampler", ["PLMS", "UniPC"])
def test_a_copy_of_the_timesteps_is_refused(sampler: str) -> None:
    """The image-to-image schedule is written into the view of the tail the pipeline took before it
    said where it starts (``get_timesteps``): a pipeline that copied them instead would give the
    model other timesteps than the scheduler steps over, so its first step says so."""
    scheduler = make_scheduler(sampler, SD15_SCHEDULER)
    scheduler.set_timesteps(8)
    copied = scheduler.timesteps[4:].clone()
    scheduler.set_begin_index(4)
    assert float(copied[0]) != float(scheduler.timesteps[4])
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(RuntimeError, match="copied"):
        scheduler.step(model(x, float(copied[0])), copied[0], x)


@pytest.mark.parametrize(
    "pipeline",
    [
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
        "StableDiffusionControlNetImg2ImgPipeline",
    ],
)
def test_each_image_to_image_pipeline_runs_the_schedule_written(pipeline: str) -> None:
    """Each diffusers image-to-image pipeline the runtime calls takes its view of the schedule's
    tail before it tells the scheduler where it starts (``get_timesteps``), so it runs the
    schedule the scheduler writes there: SD WebUI's, from the timestep below its noise (8 steps at
    0.6: PLMS's first step evaluated at 376 and 251, UniPC's time-uniform from 376)."""
    written = {"PLMS": [376.0, 251.0, 251.0, 126.0], "UniPC": [376.0, 282.0, 188.0, 94.0]}
    for sampler, timesteps in written.items():
        scheduler = make_scheduler(sampler, SD15_SCHEDULER)
        n, strength = img2img_schedule(sampler, 8, 0.6)
        scheduler.set_timesteps(n)
        them = getattr(diffusers, pipeline).get_timesteps(_Holding(scheduler), n, strength, "cpu")
        assert [float(t) for t in them[0]] == timesteps and them[1] == 4, sampler


class _Holding:
    """A pipeline's ``self`` as ``get_timesteps`` reads it: its scheduler."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.denoising_start = None
