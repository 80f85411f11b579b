"""The seed's own v1alpha1 example requests, verbatim (``sdfleet demo`` sends them; tests use them).

Sources in the seed repository (aws-samples/stable-diffusion-on-eks): ``V1ALPHA1_T2I`` is
``test/v1alpha1/t2i.json``; ``V1ALPHA1_I2I`` is ``deploy/DemoUI/payload2.json``, whose input image
link (``IMAGE_LINK_PLACEHOLDER``) points at the internet and is replaced by a local URL before use.
"""

from __future__ import annotations

from typing import Any

SEED_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
IMAGE_LINK_PLACEHOLDER = "https://www.segmind.com/sd-img2img-input.jpeg"

V1ALPHA1_T2I: dict[str, Any] = {
    "alwayson_scripts": {
        "task": "text-to-image",
        "sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors",
        "id_task": "test-t2i",
        "save_dir": "outputs",
    },
    "prompt": "A dog",
    "steps": 16,
    "width": 512,
    "height": 512,
}

V1ALPHA1_I2I: dict[str, Any] = {
    "alwayson_scripts": {
        "task": "image-to-image",
        "image_link": IMAGE_LINK_PLACEHOLDER,
        "sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors",
        "id_task": "17836",
        "sd_vae": "v1-5-pruned-emaonly.safetensors",
        "uid": "456",
        "save_dir": "outputs",
    },
    "prompt": "A fantasy landscape, trending on artstation, mystical sky",
    "seed": -1,
    "steps": 16,
    "sampler_index": "Euler",
    "denoising_strength": 0.75,
    "cfg_scale": 7,
    "width": 512,
    "height": 512,
    "negative_prompt": "nude, disfigured, blurry",
}
