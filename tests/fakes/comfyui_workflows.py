"""ComfyUI workflows (API format) shared by the unit tests (test server) and the interop suite (real
ComfyUI): the seed's pipeline workflow at a chosen size, steps, seed and checkpoint, and variants."""

from __future__ import annotations

import copy
from typing import Any

from seed_payloads import V1ALPHA2_PIPELINE

SEED_CKPT = "v1-5-pruned-emaonly.safetensors"


def txt2img(
    *, steps: int = 4, size: int = 64, seed: int = 1, ckpt: str = SEED_CKPT, prefix: str = "sdfleet-test"
) -> dict[str, Any]:
    """The seed's text-to-image pipeline (KSampler 3, checkpoint 4, latent 5, decode 8, SaveImage 9)."""
    flow: dict[str, Any] = copy.deepcopy(V1ALPHA2_PIPELINE["task"]["content"])
    flow["3"]["inputs"].update(steps=steps, seed=seed)
    flow["4"]["inputs"]["ckpt_name"] = ckpt
    flow["5"]["inputs"].update(width=size, height=size)
    flow["9"]["inputs"]["filename_prefix"] = prefix
    return flow


def preview_only(**kwargs: Any) -> dict[str, Any]:
    """``txt2img`` whose only output is a PreviewImage (``temp`` images ComfyUI does not keep)."""
    flow = txt2img(**kwargs)
    flow["9"] = {"inputs": {"images": ["8", 0]}, "class_type": "PreviewImage"}
    return flow


def with_load_image(flow: dict[str, Any], image: str, node: str = "10") -> dict[str, Any]:
    """``flow`` plus a LoadImage of ``image`` saved by its own SaveImage (``node`` and ``node``+1)."""
    flow = copy.deepcopy(flow)
    flow[node] = {"inputs": {"image": image}, "class_type": "LoadImage"}
    flow[str(int(node) + 1)] = {
        "inputs": {"filename_prefix": "sdfleet-input", "images": [node, 0]},
        "class_type": "SaveImage",
    }
    return flow


def img2img(image: str, **kwargs: Any) -> dict[str, Any]:
    """``txt2img`` sampling from a LoadImage (node 10) encoded by VAEEncode (node 12), denoise 0.6."""
    flow = txt2img(**kwargs)
    flow["10"] = {"inputs": {"image": image}, "class_type": "LoadImage"}
    flow["12"] = {"inputs": {"pixels": ["10", 0], "vae": ["4", 2]}, "class_type": "VAEEncode"}
    flow["3"]["inputs"].update(latent_image=["12", 0], denoise=0.6)
    del flow["5"]
    return flow


def animated(**kwargs: Any) -> dict[str, Any]:
    """``txt2img`` of 3 frames saved as an animated WebP (core's SaveAnimatedWEBP, under "images")
    and as a GIF by VideoHelperSuite's VHS_VideoCombine (under "gifs")."""
    flow = txt2img(**kwargs)
    flow["5"]["inputs"]["batch_size"] = 3
    flow["9"] = {
        "inputs": {"images": ["8", 0], "filename_prefix": "anim", "fps": 6},
        "class_type": "SaveAnimatedWEBP",
    }
    flow["10"] = {
        "inputs": {"images": ["8", 0], "frame_rate": 8, "format": "image/gif", "filename_prefix": "clip"},
        "class_type": "VHS_VideoCombine",
    }
    return flow
