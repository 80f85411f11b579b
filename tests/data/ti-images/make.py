"""Makes this folder's embeddings stored in images with SD WebUI 1.10.1's own code
(``modules/textual_inversion/image_embedding.py``: ``embedding_to_b64`` for the PNG text chunk its
training writes, ``insert_image_data_embed`` for the data it draws into the image's sides). Run
with SD WebUI's Python, its source folder given:

    ../venv/bin/python tests/data/ti-images/make.py /path/to/stable-diffusion-webui

Each embedding's vectors are also written as ``<name>.expected.safetensors`` (float32), what a
reader must find. Widths 32 (the tiny test model's text encoder) and 768 (SD 1.5's).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

sys.path.insert(0, str(Path(sys.argv[1]) / "modules" / "textual_inversion"))
import image_embedding as ie

HERE = Path(__file__).resolve().parent


def data(name: str, width: int, count: int, seed: int) -> dict[str, object]:
    vectors = torch.randn(count, width, generator=torch.Generator().manual_seed(seed))
    save_file({"emb_params": vectors}, str(HERE / f"{name}.expected.safetensors"))
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors},
        "name": name,
        "step": 100 + seed,
        "sd_checkpoint": "a1b2c3d4",
        "sd_checkpoint_name": "made-for-it",
    }


def base(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(16, 255, (64, 48, 3), dtype=np.uint8))  # no black column


def chunk(d: dict[str, object]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", ie.embedding_to_b64(d))
    return info


for width, suffix in ((32, ""), (768, "-sd15")):
    # as SD WebUI's training saves one: the data drawn into its sides and in a text chunk
    both = data(f"ti-both{suffix}", width, 2, 1)
    ie.insert_image_data_embed(base(1), both).save(HERE / f"both{suffix}.png", pnginfo=chunk(both))
    # the text chunk only, and the drawn data only (a PNG and a lossless WebP)
    base(2).save(HERE / f"chunk{suffix}.png", pnginfo=chunk(data(f"ti-chunk{suffix}", width, 3, 2)))
    ie.insert_image_data_embed(base(3), data(f"ti-pixels{suffix}", width, 1, 3)).save(
        HERE / f"pixels{suffix}.png"
    )
    drawn = ie.insert_image_data_embed(base(4), data(f"ti-webp{suffix}", width, 2, 4))
    drawn.save(HERE / f"drawn{suffix}.webp", lossless=True)
    # images that hold no embedding: a preview (by its name) and a plain picture
    base(5).save(HERE / f"plain{suffix}.png")
    base(6).save(
        HERE / f"pixels{suffix}.preview.png", pnginfo=chunk(data(f"ti-preview{suffix}", width, 1, 6))
    )
