"""What the diffusers runtime does not implement fails the task by name (the seed's SD WebUI
honours every field; these ran without them and "succeeded"), and the seed's own payloads, which
ask for none of them, are not refused."""

from __future__ import annotations

from typing import Any

import pytest

from sdfleet.compat import v1alpha1, v1alpha2
from sdfleet.errors import Reject
from sdfleet.runtimes.unsupported import (
    RUNS,
    batches,
    images_made,
    off_defaults,
    refuse,
    refuse_kind,
    unsupported,
)
from sdfleet.tasks import Task, TaskType
from seed_payloads import (
    V1ALPHA1_I2I,
    V1ALPHA1_I2I_DOCS,
    V1ALPHA1_T2I,
    V1ALPHA1_T2V,
    V1ALPHA2_I2I,
    V1ALPHA2_I2I_IMAGE_LINK,
    V1ALPHA2_T2I,
    copy_of,
    with_image_link,
)

URL = "http://127.0.0.1:9/cat.png"


def task_of(body: dict[str, Any]) -> Task:
    if "task" in body:
        return v1alpha2.to_task(with_image_link(body, URL), tenant="t")
    return v1alpha1.to_task(with_image_link(body, URL), tenant="t")


@pytest.mark.parametrize(
    "body",
    [V1ALPHA1_T2I, V1ALPHA1_I2I, V1ALPHA1_I2I_DOCS, V1ALPHA2_T2I, V1ALPHA2_I2I, V1ALPHA2_I2I_IMAGE_LINK],
)
def test_the_seeds_own_payloads_ask_for_nothing_missing(body: dict[str, Any]) -> None:
    assert unsupported(task_of(body).params) == []


def test_each_field_the_runtime_would_leave_out_is_named() -> None:
    body = copy_of(V1ALPHA1_T2I)
    body["alwayson_scripts"]["controlnet"] = {"args": [{"model": "control_v11p_sd15_canny"}]}
    body["alwayson_scripts"]["AnimateDiff"] = {"args": [{"enable": True}]}
    body.update(
        enable_hr=True, hr_prompt="another AND more", n_iter=2, restore_faces=True, tiling=False,
        subseed_strength=0.3,
        override_settings={"sd_vae": "does-not-exist", "CLIP_stop_at_last_layers": 2},
    )  # fmt: skip
    found = unsupported(task_of(body).params)
    assert sorted(found) == sorted(
        [
            "alwayson_scripts.controlnet",
            "alwayson_scripts.AnimateDiff",
            "restore_faces",  # variation seeds with a hires fix run now (test_diffusers_variation)
            "override_settings.sd_vae",
        ]
    ), found
    with pytest.raises(Reject, match=r"the diffusers runtime does not implement .*alwayson_scripts") as e:
        refuse("diffusers", TaskType.TEXT_TO_IMAGE, task_of(body).params)
    assert e.value.code == "unsupported_option"
    inpaint = copy_of(V1ALPHA2_I2I)
    inpaint["task"]["content"]["mask"] = "iVBORw0KGgo="
    i2i = TaskType.IMAGE_TO_IMAGE  # inpainting runs (test_inpainting.py), a second latent mask does not
    assert unsupported(task_of(inpaint).params, i2i) == []
    inpaint["task"]["content"]["latent_mask"] = "iVBORw0KGgo="
    assert unsupported(task_of(inpaint).params, i2i) == ["latent_mask"]


def test_what_asks_for_the_defaults_is_not_refused() -> None:
    body = copy_of(V1ALPHA1_T2I)
    body.update(
        enable_hr=False, n_iter=1, restore_faces=False, styles=[], subseed_strength=0,
        override_settings={"sd_vae": "Automatic", "CLIP_stop_at_last_layers": 2},
        send_images=True, save_images=False,
    )  # fmt: skip
    assert unsupported(task_of(body).params) == []


def test_the_refiners_options_pass_at_sd_webuis_values_and_are_refused_at_others() -> None:
    """``hires_fix_refiner_pass`` and ``refiner_switch_by_sample_steps`` were refused as any
    override; the diffusers runtime reads them now (``test_diffusers_refiner.py``). A value SD
    WebUI does not offer is ``invalid_params`` at the door, a refiner or not."""
    t2i = task_of(V1ALPHA1_T2I)
    for chosen in ({"hires_fix_refiner_pass": "both passes"}, {"refiner_switch_by_sample_steps": True}):
        params = t2i.params.model_copy(update={"extra": {"override_settings": chosen}})
        assert unsupported(params) == []
        refuse("diffusers", t2i.type, params)
    for chosen in ({"hires_fix_refiner_pass": "all"}, {"refiner_switch_by_sample_steps": 1}):
        params = t2i.params.model_copy(update={"extra": {"override_settings": chosen}})
        with pytest.raises(Reject) as e:
            refuse("diffusers", t2i.type, params)
        assert e.value.code == "invalid_params" and next(iter(chosen)) in e.value.reason
        refuse("a1111", t2i.type, params)  # SD WebUI's own to take


def test_each_runtime_runs_the_task_types_it_says() -> None:
    """``RUNS`` is what the API refuses at the door by; the runtimes check against the same table."""
    from sdfleet.runtimes._a1111_payload import ENDPOINTS

    assert set(ENDPOINTS) == RUNS["a1111"], "the a1111 runtime runs what it has an SD WebUI endpoint for"
    with pytest.raises(Reject, match=r"diffusers runtime cannot run 'pipeline' tasks.*comfyui runtime") as e:
        refuse_kind("diffusers", TaskType.PIPELINE)
    assert e.value.code == "unsupported_task"
    with pytest.raises(Reject, match=r"'text-to-image' tasks: .* diffusers or a1111 runtime"):
        refuse_kind("comfyui", TaskType.TEXT_TO_IMAGE)
    refuse_kind("my-plugin", TaskType.PIPELINE)  # a runtime not listed decides for itself


def test_refuse_says_what_the_runtime_would_fail_the_task_with() -> None:
    t2i = task_of(V1ALPHA1_T2I)
    for runtime in ("diffusers", "a1111", "synthetic"):
        refuse(runtime, t2i.type, t2i.params)  # the seed's own payload runs everywhere but comfyui
    codes = {}
    for name, kind, params in [
        ("comfyui", t2i.type, t2i.params),
        ("diffusers", t2i.type, t2i.params.model_copy(update={"extra": {"restore_faces": True}})),
        ("diffusers", t2i.type, t2i.params.model_copy(update={"sampler": "DPM++ 3M SDE"})),
    ]:
        with pytest.raises(Reject) as e:
            refuse(name, kind, params)
        codes[e.value.code] = e.value.reason
    assert list(codes) == ["unsupported_task", "unsupported_option", "unknown_sampler"], codes
    assert "DPM++ 2M Karras" in codes["unknown_sampler"], "the samplers it has are listed"
    # SD WebUI's samplers depend on the server: the a1111 runtime asks it, not this table
    refuse("a1111", t2i.type, t2i.params.model_copy(update={"sampler": "DPM++ 3M SDE"}))
    # a scheduler picks the Karras variant, as the runtime does
    refuse(
        "diffusers",
        t2i.type,
        t2i.params.model_copy(update={"sampler": "Euler", "extra": {"scheduler": "Karras"}}),
    )
    # a schedule type that is no string (a message published past the API may hold any JSON) was
    # an AttributeError: a 500 at the API
    for scheduler in (1, True, [1], {"a": 1}):
        params = t2i.params.model_copy(update={"sampler": "Euler", "extra": {"scheduler": scheduler}})
        with pytest.raises(Reject) as e:
            refuse("diffusers", t2i.type, params)
        assert e.value.code == "unknown_scheduler" and "Karras" in e.value.reason, e.value.reason


def test_the_seeds_text_to_video_example_runs_on_sd_webui_and_is_refused_by_name_by_diffusers() -> None:
    """``test/v1alpha1/t2v.json`` asks for 32 frames as SD WebUI's batch (AnimateDiff): every
    fleet refused it (``batch_size`` ≤ 16 at the door), an a1111 one included."""
    from sdfleet.runtimes._a1111_payload import build_body
    from sdfleet.runtimes.base import Job

    t2v = task_of(V1ALPHA1_T2V)
    assert t2v.params.batch_size == 32
    refuse("a1111", t2v.type, t2v.params)  # SD WebUI with the extension runs it
    body = build_body(Job(t2v.id, t2v.type, t2v.model, t2v.params))
    assert (
        body["batch_size"] == 32 and body["alwayson_scripts"]["AnimateDiff"]["args"][0]["video_length"] == 32
    )
    with pytest.raises(Reject) as e:
        refuse("diffusers", t2v.type, t2v.params)
    assert (e.value.code, e.value.reason) == (
        "too_large",
        "the diffusers runtime makes at most 16 images a task, not 32 (batch_size): ask for fewer, "
        "or send the task to a queue with the a1111 runtime",
    )
    sixteen = t2v.params.model_copy(update={"batch_size": 16, "extra": {}})
    refuse("diffusers", t2v.type, sixteen)


def test_n_iter_batches_count_toward_the_images_a_diffusers_task_makes() -> None:
    t2i = task_of(V1ALPHA1_T2I)
    four_by_four = t2i.params.model_copy(update={"batch_size": 4, "extra": {"n_iter": 4}})
    refuse("diffusers", t2i.type, four_by_four)  # SD WebUI's batch count: was unsupported_option
    assert images_made(t2i.type, four_by_four, 0) == 16
    five = four_by_four.model_copy(update={"extra": {"n_iter": 5}})
    with pytest.raises(Reject) as e:
        refuse("diffusers", t2i.type, five)
    assert (e.value.code, e.value.reason) == (
        "too_large",
        "the diffusers runtime makes at most 16 images a task, not 20 (batch_size 4 × n_iter 5): "
        "ask for fewer, or send the task to a queue with the a1111 runtime",
    )
    refuse("a1111", t2i.type, five)  # SD WebUI runs its batches one after another
    for bad in (0, 101, "2", 1.5, True):  # what a message published past the API may hold
        with pytest.raises(Reject) as e:
            batches(t2i.params.model_copy(update={"extra": {"n_iter": bad}}))
        assert (e.value.code, e.value.reason) == ("invalid_params", "n_iter must be an integer from 1 to 100")
    # image-to-image with several inputs: a batch is as large as the inputs (SD WebUI's rule)
    i2i = t2i.params.model_copy(update={"batch_size": 4, "extra": {"n_iter": 2}})
    assert images_made(TaskType.IMAGE_TO_IMAGE, i2i, 2) == 4
    assert images_made(TaskType.IMAGE_TO_IMAGE, i2i, 1) == 8


def test_fields_at_values_that_change_the_images_are_named_and_their_defaults_pass() -> None:
    """They were dropped without a word: ``resize_mode`` 1 (crop and resize) ran as a plain
    resize, ``s_churn`` and ``s_noise`` as 0 and 1 (Euler's run now: ``test_diffusers_runtime``),
    a refiner as none (it runs now: ``test_diffusers_refiner.py``), an infotext unread."""
    t2i, i2i = TaskType.TEXT_TO_IMAGE, TaskType.IMAGE_TO_IMAGE
    # SD WebUI's defaults, and what webuiapi sends with every request
    webuiapi = {"eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "seed_resize_from_h": -1}
    webuiapi |= {"seed_resize_from_w": -1, "resize_mode": 0, "disable_extra_networks": False}
    for kind in (t2i, i2i):
        assert off_defaults(webuiapi, kind, "Euler a") == []
    changed = {"s_churn": 0.3, "s_noise": 1.01, "s_min_uncond": 0.2, "refiner_checkpoint": "sdxl_refiner"}
    changed |= {"infotext": "Steps: 4"}
    # (initial_noise_multiplier runs now: test_diffusers_variation; s_min_uncond: test_diffusers_ngms)
    changed |= {"seed_resize_from_w": 512, "resize_mode": 3, "initial_noise_multiplier": 0.9, "eta": 0.5}
    assert off_defaults(changed, i2i, "DPM2 a Karras") == [
        "infotext='Steps: 4'",
        "resize_mode=3",
        "eta=0.5 (with DPM2 a)",  # k-diffusion's fields where SD WebUI's sampler takes them
        "s_noise=1.01 (with DPM2 a)",
    ]
    # Euler's churn runs (its s_noise with it), SD WebUI's Euler a takes no s_noise, DPM2's churn
    # (or a hires pass's) does not run, and the samplers that take none ignore them, as there
    churn = {"s_churn": 0.3, "s_noise": 1.01, "s_tmin": 0.1}
    assert off_defaults(churn, t2i, "Euler") == off_defaults(churn, t2i, "Euler a") == []
    assert off_defaults(churn, t2i, "DPM++ 2M Karras") == off_defaults(churn, t2i, "DDIM") == []
    assert off_defaults(churn, t2i, "DPM2 Karras") == ["s_churn=0.3 (with DPM2)"]
    hires = churn | {"enable_hr": True, "hr_sampler_name": "Heun"}
    assert off_defaults(hires, t2i, "Euler") == ["s_churn=0.3 (with Heun)"]
    # image-to-image's own fields mean nothing to text-to-image (SD WebUI has none there); DDIM
    # takes its eta, other samplers ignore it, as SD WebUI's do
    assert off_defaults({"resize_mode": 2, "eta": 0.5}, t2i, "DDIM") == []
    assert off_defaults({"resize_mode": 1}, i2i, None) == off_defaults({"resize_mode": 2}, i2i, None) == []
    params = task_of(V1ALPHA1_T2I).params.model_copy(update={"extra": {"resize_mode": 3}})
    with pytest.raises(Reject) as e:
        refuse("diffusers", i2i, params)
    assert e.value.code == "unsupported_option" and "resize_mode=3" in e.value.reason
    refuse("a1111", i2i, params)  # SD WebUI does it
