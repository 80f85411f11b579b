"""SD WebUI's hires fix as a task asks for it (``sdfleet.hires``): sizes, crop, steps and words as
SD WebUI 1.10.1's ``calculate_target_resolution`` and infotext make them."""

from __future__ import annotations

from typing import Any

import pytest

from sdfleet import hires
from sdfleet.errors import Reject
from sdfleet.tasks import TaskParams, TaskType

T2I = TaskType.TEXT_TO_IMAGE


def params(width: int = 512, height: int = 512, **extra: Any) -> TaskParams:
    return TaskParams(prompt="p", width=width, height=height, extra={"enable_hr": True, **extra})


@pytest.mark.parametrize(
    ("size", "extra", "made"),
    [
        ((512, 512), {}, (1024, 1024)),  # hr_scale 2 by default
        ((512, 768), {"hr_scale": 1.5}, (768, 1152)),
        ((512, 512), {"hr_scale": 1.3}, (664, 664)),  # int(665.6) = 665, made in whole latent pixels
        ((512, 768), {"hr_resize_x": 1024}, (1024, 1536)),  # the other side keeps the aspect ratio
        ((512, 768), {"hr_resize_y": 1024}, (680, 1024)),  # 1024 * 512 // 768 = 682: 85 latent pixels
        ((512, 512), {"hr_resize_x": 1024, "hr_resize_y": 768}, (1024, 768)),  # fit, then crop the rest
        ((768, 512), {"hr_resize_x": 1024, "hr_resize_y": 1024}, (1024, 1024)),
    ],
)
def test_the_size_of_the_second_pass(
    size: tuple[int, int], extra: dict[str, Any], made: tuple[int, int]
) -> None:
    second = hires.plan(T2I, params(*size, **extra))
    assert second is not None and second.size == made


def test_a_crop_is_half_each_side_in_latent_pixels() -> None:
    second = hires.plan(T2I, params(512, 512, hr_resize_x=1024, hr_resize_y=768))
    assert second is not None
    assert (second.latent_width, second.latent_height, second.crop_x, second.crop_y) == (128, 128, 0, 32)


def test_what_the_infotext_says_in_sd_webuis_order() -> None:
    asked = params(hr_scale=2, hr_second_pass_steps=10, hr_upscaler="Lanczos", hr_sampler_name="DDIM")
    second = hires.plan(T2I, asked)
    assert second is not None
    later = (("Hires prompt", None), ("Hires negative prompt", None), ("Hires schedule type", None))
    assert second.generation_params == (
        ("Denoising strength", 0.75),
        ("Hires sampler", "DDIM"),
        *later,  # SD WebUI's places for what is said later (its info's extra_generation_params)
        ("Hires upscale", 2.0),
        ("Hires steps", 10),
        ("Hires upscaler", "Lanczos"),
    )
    assert second.latent_mode is None and second.steps == 10
    latent = hires.plan(T2I, params(hr_resize_x=640, hr_resize_y=640))
    assert latent is not None and latent.upscaler == "Latent" and latent.latent_mode == ("bilinear", False)
    assert latent.generation_params == (("Denoising strength", 0.75), *later, ("Hires resize", "640x640"))


def test_no_second_pass_without_enable_hr_or_for_image_to_image() -> None:
    assert hires.plan(T2I, TaskParams(prompt="p")) is None
    assert hires.plan(TaskType.IMAGE_TO_IMAGE, params()) is None


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"hr_scale": 0}, "hr_scale must be above 0 and at most 8, not 0"),
        ({"hr_scale": 9}, "hr_scale must be above 0 and at most 8, not 9"),
        ({"hr_scale": "2"}, "hr_scale must be a number, not '2'"),
        ({"hr_resize_x": -8}, "hr_resize_x must be a whole number from 0, not -8"),
        ({"hr_second_pass_steps": 2.5}, "hr_second_pass_steps must be a whole number from 0, not 2.5"),
        ({"hr_scale": 0.01}, "the hires pass would be 5x5: at least 8x8"),
        ({"hr_upscaler": 4}, "hr_upscaler must be a name, not 4"),
    ],
)
def test_values_that_make_no_second_pass_are_refused(extra: dict[str, Any], words: str) -> None:
    with pytest.raises(Reject) as raised:
        hires.plan(T2I, params(**extra))
    assert (raised.value.code, raised.value.reason) == ("invalid_params", words)


def test_what_the_runtime_does_not_do_is_named() -> None:
    same = params(hr_prompt="", hr_negative_prompt=None, hr_checkpoint_name="Use same checkpoint")
    assert hires.unsupported(same) == []
    assert hires.unsupported(params(hr_prompt="p")) == []  # the first pass's prompt again
    # another prompt and another checkpoint run (test_diffusers_hires.py)
    assert hires.unsupported(params(hr_prompt="other", hr_checkpoint_name="sdxl.safetensors")) == []
    assert hires.unsupported(params(firstpass_image="iVBOR")) == ["firstpass_image"]


@pytest.mark.parametrize(
    ("name", "checkpoint"), [(None, None), ("", None), ("Use same checkpoint", None), ("b", "b")]
)
def test_the_second_pass_names_its_checkpoint_in_its_place(name: str | None, checkpoint: str | None) -> None:
    plan = hires.plan(T2I, params(hr_checkpoint_name=name, hr_sampler_name="Euler a"))
    assert plan is not None and plan.checkpoint == checkpoint
    words = [word for word, _ in plan.generation_params]
    # SD WebUI's order: its title is said by the run, after the strength and before the sampler
    assert (
        words[:3] == ["Denoising strength", "Hires checkpoint", "Hires sampler"]
        if checkpoint
        else (words[:2] == ["Denoising strength", "Hires sampler"])
    )


@pytest.mark.parametrize("denoising", [0.05, 0.3, 0.5, 0.7, 0.75, 0.999, 1.0])
def test_the_second_pass_runs_exactly_its_steps(denoising: float) -> None:
    for steps in range(1, 60):
        schedule = hires.second_pass_steps(steps, denoising)
        assert int(schedule * min(denoising, 0.999)) == steps  # what diffusers' img2img runs of it
