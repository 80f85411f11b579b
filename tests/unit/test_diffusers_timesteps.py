"""DDIM and PLMS step as SD WebUI 1.10's (``_diffusers_timesteps``): each scheduler, driven as a
diffusers pipeline drives it, against SD WebUI's own sampling functions (``ddim``, ``plms`` of
``sd_samplers_timesteps_impl``, and ``sample_img2img``'s noising), copied below, with one model
standing in for the UNet."""

from __future__ import annotations

from typing import Any

import diffusers
import pytest
import torch
from test_diffusers_runtime import SD15_SCHEDULER as SD15

from sdfleet.runtimes._diffusers_info import sampler_name_of
from sdfleet.runtimes._diffusers_pipes import make_scheduler
from sdfleet.runtimes._diffusers_samplers import hires_schedule, img2img_schedule, sd_webui_timesteps

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
    for whole in (True, False):
        scheduler = make_scheduler(sampler, SD15_SCHEDULER, whole=whole)
        own = own_of(scheduler)
        scheduler.set_timesteps(steps)
        own.set_timesteps(steps)
        assert torch.equal(scheduler.timesteps, own.timesteps)
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
        assert torch.equal(ours(scheduler, noise, scheduler.timesteps)[0], ours(own, noise, own.timesteps)[0])
        if sampler == "DDIM" and len(own.timesteps) > 1:  # an image-to-image call's start: diffusers' noise
            scheduler.set_begin_index(1)
            start = own.timesteps[1:2]
            assert torch.equal(scheduler.add_noise(noise, noise, start), own.add_noise(noise, noise, start))
    for d in (0.3, 0.6, 1.0):
        assert img2img_schedule("DDIM", steps, d) == img2img_schedule(None, steps, d)


@pytest.mark.parametrize("steps", [4, 8, 15, 30, 60])
def test_ddim_image_to_image_noises_and_steps_as_sd_webuis(steps: int) -> None:
    """SD WebUI's image-to-image noises its input to ``timesteps[t_enc]`` and evaluates from the
    one below (``t_enc - 1`` evaluations); the strength handed to diffusers starts its call there
    and the scheduler noises one timestep above it (8 steps at 0.6: 3.1 of 255 apart, 0.000
    after). Where SD WebUI evaluates nothing (it answers the noised input), or diffusers' slicing
    of the call's steps cannot start where SD WebUI's does (a few evaluations of many steps), the
    call keeps diffusers' strength."""
    a = alphas()
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    kept, ran = [], []
    for d in (k / 20 for k in range(1, 21)):
        n, strength = img2img_schedule("DDIM", steps, d)
        t_enc = int(min(d, 0.999) * steps)
        timesteps = timesteps_of(steps)
        if t_enc < 2 or len(timesteps) - t_enc > steps - 1:  # diffusers skips at most steps - 1
            assert (n, strength) == img2img_schedule(None, steps, d)
            kept.append(d)
            continue
        level = a[timesteps[t_enc]]
        theirs, their_calls = their_ddim(
            (image * level.sqrt() + noise * (1 - level).sqrt()).float(), timesteps[:t_enc]
        )
        scheduler = make_scheduler("DDIM", SD15_SCHEDULER, whole=False)
        scheduler.set_timesteps(n)
        run = begun(scheduler, n, strength)
        started = scheduler.add_noise(image, noise, run[:1])
        mine, my_calls = ours(scheduler, started, run)
        assert my_calls == their_calls, (steps, d)
        assert scheduler.sd_webui_total_steps == t_enc + 1  # launch_sampling(t_enc + 1)
        assert torch.allclose(mine, theirs, atol=1e-4), (steps, d)
        ran.append(d)
    assert ran and (not kept or max(kept) < min(ran))  # the lowest strengths only


def test_a_ddim_hires_pass_runs_sd_webuis_schedule() -> None:
    """A hires pass of ``n`` steps at ``d``: SD WebUI's image-to-image given the steps, over a
    schedule ``int(n / min(d, 0.999))`` long from its ``n - 1``-th timestep (``n - 2``
    evaluations); the second pass here starts at the same, noised one timestep above."""
    for steps in (4, 8, 20):
        for d in (0.3, 0.6, 0.95):
            schedule, strength = hires_schedule("DDIM", steps, d)
            assert schedule == int(steps / min(d, 0.999))
            scheduler = make_scheduler("DDIM", SD15_SCHEDULER, whole=False)
            scheduler.set_timesteps(schedule)
            run = begun(scheduler, schedule, strength)
            timesteps = timesteps_of(schedule)
            assert [int(t) for t in run] == timesteps[steps - 2 : 0 : -1], (steps, d)
            assert scheduler.sd_webui_total_steps == steps
            noised = scheduler.add_noise(torch.ones(1), torch.zeros(1), run[:1])
            assert float(noised) == pytest.approx(float(alphas()[timesteps[steps - 1]].sqrt()), rel=1e-5)


def test_plms_mid_schedule_keeps_diffusers_own() -> None:
    """PLMS's first step is two evaluations (diffusers gives its second timestep twice): a call that
    starts mid-schedule cannot take it, so image-to-image and a hires pass keep diffusers' PLMS."""
    whole = make_scheduler("PLMS", SD15_SCHEDULER)
    part = make_scheduler("PLMS", SD15_SCHEDULER, whole=False)
    assert type(part) is diffusers.PNDMScheduler and type(whole) is not diffusers.PNDMScheduler
    assert type(make_scheduler("DDIM", SD15_SCHEDULER, whole=False)) is type(
        make_scheduler("DDIM", SD15_SCHEDULER)
    )
    whole.set_timesteps(15)
    assert [int(t) for t in whole.timesteps[:4]] == [991, 925, 925, 859]


@pytest.mark.parametrize("steps", [8, 15, 20])
def test_unipc_is_configured_as_sd_webuis_own(steps: int) -> None:
    """SD WebUI's UniPC is its own implementation (``uni_pc``) at its options' defaults: order 3,
    variant bh1, the lower order at the end, ``time_uniform`` steps from timestep 999 to 0 and the
    last to the model's first timestep (the continuous time ``1 / N``), not to 0. diffusers' at its
    defaults (order 2, bh2) over the model's ``leading`` schedule (951 … 1) was 9.0 of 255 from SD
    WebUI's image at 8 steps (the issue note)."""
    scheduler = make_scheduler("UniPC", SD15_SCHEDULER)
    scheduler.set_timesteps(steps)
    uniform = torch.linspace(999, 0, steps + 1, dtype=torch.float64)[:-1]
    assert [int(t) for t in scheduler.timesteps] == [round(float(t)) for t in uniform]  # diffusers' rounding
    first = alphas()[0]
    assert float(scheduler.sigmas[-1]) == pytest.approx(float(((1 - first) / first) ** 0.5), rel=1e-4)
    config = scheduler.config
    assert (config.solver_order, config.solver_type, config.lower_order_final) == (3, "bh1", True)
    # image-to-image and a hires pass: SD WebUI's run their steps from the timestep below their
    # noise to 0, not the tail of this schedule; diffusers' own there (3.7 of 255 apart, a Latent
    # hires pass 2.7 where it was 7.8 with the first pass also diffusers')
    part = make_scheduler("UniPC", SD15_SCHEDULER, whole=False).config
    assert (part.solver_order, part.solver_type, part.timestep_spacing) == (2, "bh2", "leading")
