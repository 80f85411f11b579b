"""An SD 1.5-architecture pipeline with random weights, built offline, for timing on real hardware.

Same shapes as Stable Diffusion 1.5 (UNet 860M parameters, VAE 84M, CLIP ViT-L/14 text encoder),
so per-image time and memory match the real model; the images are noise. The tokenizer uses the
small locally written byte vocabulary (a smaller embedding table than CLIP's 49408 tokens, which
costs nothing measurable). Weights are saved in fp16 (about 2.2 GB). Imports torch when called.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from sdfleet.models.tiny import MARKER, tokenizer_and_text_config

# The marker flags a random-weight test model (not only a small one): results carry its note.
NOTE = {"tiny": True, "note": "random weights: SD 1.5 architecture for timing, output is noise"}
UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "sample_size": 512,
}
TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}


def build_random_sd15(seed: int, scratch: Path) -> Any:
    """The pipeline in memory (fp32, randomly initialised)."""
    import diffusers
    import torch
    import transformers

    d: Any = diffusers  # untyped constructors, which mypy --strict refuses to call
    t: Any = transformers
    tokenizer, text_config = tokenizer_and_text_config(scratch, TEXT)
    torch.manual_seed(seed)
    return d.StableDiffusionPipeline(
        unet=d.UNet2DConditionModel(**UNET),
        vae=d.AutoencoderKL(**VAE),
        text_encoder=t.CLIPTextModel(text_config).eval(),
        tokenizer=tokenizer,
        scheduler=d.EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_random_sd15(dest_dir: Path, name: str = "random-sd15", *, seed: int = 0) -> Path:
    """Write ``dest_dir/name/`` (a diffusers folder, fp16 weights); returns the folder.

    The folder carries the ``sdfleet-tiny.json`` marker, so results say that the output is noise.
    """
    import torch

    dest_dir = Path(dest_dir)
    scratch = dest_dir / f".{name}.tokenizer-src"
    try:
        pipe = build_random_sd15(seed, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    folder = dest_dir / name
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    (folder / MARKER).write_text(json.dumps(NOTE))
    return folder
