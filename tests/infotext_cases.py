"""Requests whose infotexts ``test_infotext.py`` (runtime serve and the diffusers runtime) and
``test_infotext_interop.py`` (the real SD WebUI) compare: each of SD WebUI's words at least once."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image


def noise_png() -> str:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


BODY = {"prompt": "a cat, red: big", "steps": 2, "width": 64, "height": 64, "seed": 5}
HIRES = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 1, "denoising_strength": 0.5}
CASES: list[tuple[str, dict[str, Any]]] = [
    ("txt2img", {"sampler_name": "Euler a", "negative_prompt": "blurry"}),
    ("txt2img", {"sampler_name": "DPM++ 2M Karras"}),
    ("txt2img", {"sampler_name": "DPM++ 2M", "scheduler": "Karras"}),
    ("txt2img", {"sampler_name": "Euler", "scheduler": "Uniform"}),
    ("txt2img", {"sampler_name": "DDIM", "eta": 0.5, "scheduler": "Karras"}),
    ("txt2img", {"sampler_name": "Euler a", "eta": 0.5}),
    ("txt2img", HIRES | {"sampler_name": "DDIM", "hr_sampler_name": "Euler a", "eta": 0.5}),
    (
        "txt2img",
        {"sampler_name": "Euler", "tiling": True, "override_settings": {"CLIP_stop_at_last_layers": 2}},
    ),
    ("txt2img", {"sampler_name": "Euler", "subseed": 9, "subseed_strength": 0.3, "batch_size": 2}),
    # a batch's seeds and variation seeds go on past 2**32 - 1
    ("txt2img", {"sampler_name": "Euler", "seed": 2**32 - 1, "batch_size": 2}),
    ("txt2img", {"sampler_name": "Euler", "subseed": 2**32 - 1, "subseed_strength": 0.3, "batch_size": 2}),
    (
        "txt2img",
        {
            "sampler_name": "DDIM",
            "eta": 0.25,
            "prompt": "a (red:1.2) cat",
            "override_settings": {"emphasis": "No norm"},
            "enable_hr": True,
            "hr_scale": 1.5,
            "hr_second_pass_steps": 1,
            "denoising_strength": 0.5,
        },
    ),
    ("img2img", {"sampler_name": "Euler", "denoising_strength": 0.6, "image_cfg_scale": 1.5}),
    ("txt2img", HIRES | {"sampler_name": "Euler", "hr_scheduler": "Karras"}),
    ("txt2img", HIRES | {"sampler_name": "Euler", "hr_sampler_name": "DPM++ 2M", "hr_scheduler": "Karras"}),
    ("txt2img", HIRES | {"sampler_name": "Euler", "scheduler": "Karras", "hr_scheduler": "Karras"}),
    ("txt2img", HIRES | {"sampler_name": "DDIM", "hr_sampler_name": "Euler a"}),
    ("txt2img", HIRES | {"sampler_name": "Euler", "hr_prompt": "a dog, small", "hr_negative_prompt": "dark"}),
    ("txt2img", HIRES | {"sampler_name": "Euler", "hr_prompt": BODY["prompt"], "negative_prompt": "dark"}),
]
