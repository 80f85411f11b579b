"""What the diffusers runtime does not implement fails the task by name (the seed's SD WebUI
honours every field; these ran without them and "succeeded"), and the seed's own payloads, which
ask for none of them, are not refused."""

from __future__ import annotations

from typing import Any

import pytest

from sdfleet.compat import v1alpha1, v1alpha2
from sdfleet.errors import Reject
from sdfleet.runtimes.unsupported import refuse_unsupported, unsupported
from sdfleet.tasks import Task
from seed_payloads import (
    V1ALPHA1_I2I,
    V1ALPHA1_I2I_DOCS,
    V1ALPHA1_T2I,
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
        enable_hr=True, hr_scale=2, n_iter=2, restore_faces=True, tiling=False, subseed_strength=0.3,
        override_settings={"sd_vae": "does-not-exist", "CLIP_stop_at_last_layers": 2},
    )  # fmt: skip
    found = unsupported(task_of(body).params)
    assert sorted(found) == sorted(
        [
            "alwayson_scripts.controlnet",
            "alwayson_scripts.AnimateDiff",
            "enable_hr",
            "n_iter=2",
            "restore_faces",
            "subseed_strength",
            "override_settings.sd_vae",
        ]
    ), found
    with pytest.raises(Reject, match=r"the diffusers runtime does not implement .*enable_hr") as e:
        refuse_unsupported(task_of(body).params, "diffusers")
    assert e.value.code == "unsupported_option"
    inpaint = copy_of(V1ALPHA2_I2I)
    inpaint["task"]["content"]["mask"] = "iVBORw0KGgo="
    assert unsupported(task_of(inpaint).params) == ["mask"]


def test_what_asks_for_the_defaults_is_not_refused() -> None:
    body = copy_of(V1ALPHA1_T2I)
    body.update(
        enable_hr=False, n_iter=1, restore_faces=False, styles=[], subseed_strength=0,
        override_settings={"sd_vae": "Automatic", "CLIP_stop_at_last_layers": 2},
        send_images=True, save_images=False,
    )  # fmt: skip
    assert unsupported(task_of(body).params) == []
