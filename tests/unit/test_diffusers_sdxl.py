"""The diffusers runtime on a tiny random-weight SDXL pipeline (CPU, 64x64, 2 steps)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from sdfleet.models import ModelCatalog, make_tiny
from sdfleet.models.tiny import MARKER
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny(root, "tiny-xl", seed=0, sdxl=True)
    return root


@pytest.fixture(scope="module")
def runtime(models_dir: Path) -> DiffusersRuntime:
    return DiffusersRuntime(ModelCatalog(models_dir), default_model="tiny-xl", device="cpu")


def job(kind: TaskType = TaskType.TEXT_TO_IMAGE, **params: object) -> Job:
    base: dict[str, object] = {"prompt": "a red cat", "steps": 2, "width": 64, "height": 64, "seed": 3}
    base.update(params)
    init = base.pop("init_images", [])
    assert isinstance(init, list)
    return Job("t-xl", kind, "tiny-xl", TaskParams.model_validate(base), init_images=init)


async def no_progress(value: float) -> None:
    return None


def pixels(png: bytes) -> tuple[tuple[int, int], bytes]:
    image = Image.open(io.BytesIO(png))
    return image.size, image.tobytes()


def test_make_tiny_sdxl_writes_an_sdxl_pipeline(models_dir: Path) -> None:
    folder = models_dir / "tiny-xl"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    assert (folder / "tokenizer_2" / "tokenizer.json").is_file() and (folder / MARKER).is_file()
    unet = json.loads((folder / "unet" / "config.json").read_text())
    text_2 = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    text_1 = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    assert unet["cross_attention_dim"] == text_1["hidden_size"] + text_2["hidden_size"]
    time_ids = 6 * unet["addition_time_embed_dim"]
    assert unet["projection_class_embeddings_input_dim"] == time_ids + text_2["projection_dim"]


async def test_sdxl_txt2img_same_seed_same_bytes(runtime: DiffusersRuntime) -> None:
    first = await runtime.run(job(negative_prompt="blurry", clip_skip=2), no_progress)
    again = await runtime.run(job(negative_prompt="blurry", clip_skip=2), no_progress)
    other = await runtime.run(job(seed=4, negative_prompt="blurry", clip_skip=2), no_progress)
    assert type(runtime._cache["tiny-xl"].pipe).__name__ == "StableDiffusionXLPipeline"
    assert first.images == again.images and first.images != other.images
    assert pixels(first.images[0])[0] == (64, 64)
    assert first.model == "tiny-xl" and first.info["note"].startswith("random weights")


async def test_sdxl_img2img_same_seed_same_bytes(runtime: DiffusersRuntime) -> None:
    src = (await runtime.run(job(), no_progress)).images[0]
    i2i = job(TaskType.IMAGE_TO_IMAGE, denoising_strength=0.5, init_images=[src], sampler="Euler a")
    first = await runtime.run(i2i, no_progress)
    again = await runtime.run(i2i, no_progress)
    assert type(runtime._cache["tiny-xl"].img2img()).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert first.images == again.images
    assert pixels(first.images[0])[0] == (64, 64) and first.images[0] != src
    assert first.info["sampler_name"] == "Euler a" and first.info["denoising_strength"] == 0.5
