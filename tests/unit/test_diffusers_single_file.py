"""Single-file checkpoints without a config folder: the family read from the weights (SD 1.x, 2.x,
SDXL), loaded offline. Tiny checkpoints of each family built here; real-size layouts checked on
PyTorch's meta device (shapes without memory). CPU, 64x64, 2 steps."""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdfleet.compat import v1alpha2
from sdfleet.errors import ModelLoadError
from sdfleet.infotext import VERSION
from sdfleet.models import ModelCatalog, family, ldm, make_tiny
from sdfleet.models.clip_vocab import CLIP_VOCAB_SIZE, write_tokenizer
from sdfleet.models.unet_shape import unet_config
from sdfleet.runtimes._diffusers_detect import _v_prediction, is_v_prediction, read_shapes
from sdfleet.runtimes._diffusers_refiner import unlike
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType
from seed_payloads import V1ALPHA2_T2I

FAMILIES = {"sd1": {}, "sd2": {"sd2": True}, "sdxl": {"sdxl": True}}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name, kind in FAMILIES.items():
        make_tiny(root, f"{name}-folder", seed=3, **kind)
        make_tiny(root, f"{name}-file", seed=3, single_file=True, sidecar=False, **kind)
    # the seed's default checkpoint name, as a tiny SDXL single file with nothing next to it
    make_tiny(root, "sd_xl_turbo_1.0", seed=4, sdxl=True, single_file=True, sidecar=False)
    inpaint = read_file(root / "sd1-file.safetensors")
    inpaint[ldm.UNET_PREFIX + "input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    save_file(inpaint, str(root / "inpaint.safetensors"))
    inpaint[ldm.UNET_PREFIX + "input_blocks.0.0.weight"] = torch.zeros(32, 8, 3, 3)
    save_file(inpaint, str(root / "pix2pix.safetensors"))
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(root / "a-lora.safetensors"))
    return root


def read_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def runtime(models_dir: Path) -> DiffusersRuntime:
    return DiffusersRuntime(ModelCatalog(models_dir), device="cpu", cache_size=1)


async def no_progress(value: float) -> None:
    return None


def job(model: str) -> Job:
    params = TaskParams(
        prompt="a red cat", negative_prompt="blurry", steps=2, width=64, height=64, seed=1, sampler="Euler"
    )
    return Job("t-1", TaskType.TEXT_TO_IMAGE, model, params)


def pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).tobytes()


@pytest.mark.parametrize("name", FAMILIES)
def test_family_is_read_from_the_weights(models_dir: Path, name: str) -> None:
    assert family.detect(read_shapes(models_dir / f"{name}-file.safetensors")) == family.Family(name)


@pytest.mark.parametrize("name", FAMILIES)
async def test_single_file_without_config_is_the_same_model(runtime: DiffusersRuntime, name: str) -> None:
    folder = await runtime.run(job(f"{name}-folder"), no_progress)
    reference = runtime._cache[f"{name}-folder"].pipe
    single = await runtime.run(job(f"{name}-file.safetensors"), no_progress)
    expected = "StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline"
    pipe = runtime._cache[f"{name}-file.safetensors"].pipe
    assert type(pipe).__name__ == expected
    for part, model in reference.components.items():
        if isinstance(model, torch.nn.Module):
            weights, mine = model.state_dict(), getattr(pipe, part).state_dict()
            assert weights.keys() == mine.keys(), part
            assert all(torch.equal(weights[k], mine[k]) for k in weights), part
    # The same weights, but not at the same addresses: the folder's are read in place from its
    # safetensors files at the offsets the files give, and BLAS on some CPUs rounds differently on
    # data so placed (an AMD EPYC put one pixel channel of the SDXL image one level off).
    a, b = pixels(single.images[0]), pixels(folder.images[0])
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1


async def test_seed_default_checkpoint_loads_offline(runtime: DiffusersRuntime) -> None:
    body = copy.deepcopy(V1ALPHA2_T2I)
    body["task"]["content"] |= {"steps": 2, "width": 64, "height": 64}
    body["task"]["content"]["alwayson_scripts"] = {"sd_model_checkpoint": "sd_xl_turbo_1.0.safetensors"}
    task = v1alpha2.to_task(body, tenant="t")
    result = await runtime.run(Job(task.id, task.type, task.model, task.params), no_progress)
    assert result.model == "sd_xl_turbo_1.0.safetensors" and len(result.images) == 1
    assert Image.open(io.BytesIO(result.images[0])).size == (64, 64)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("pix2pix.safetensors", "an instruct-pix2pix model (8 input channels; 4 and 9 are supported)"),
        ("a-lora.safetensors", "no Stable Diffusion UNet"),
    ],
)
async def test_unsupported_files_fail_with_the_reason(
    runtime: DiffusersRuntime, model: str, reason: str
) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(reason)):
        await runtime.run(job(model), no_progress)


async def test_an_inpainting_checkpoint_loads_and_says_so(runtime: DiffusersRuntime) -> None:
    """An SD 1.5 "inpainting" file (9 input channels) was refused at load; SD WebUI loads it and
    writes ``Conditional mask weight`` (``test_inpainting.py`` runs such a UNet further)."""
    made = await runtime.run(job("inpaint.safetensors"), no_progress)
    assert Image.open(io.BytesIO(made.images[0])).size == (64, 64)
    assert made.info["infotexts"][0].endswith(
        f"Model: inpaint, Conditional mask weight: 1.0, Version: {VERSION}"
    )


async def test_a_unets_shape_is_read_without_loading_it(runtime: DiffusersRuntime, models_dir: Path) -> None:
    """``unet_shape.unet_config`` (a refiner of another shape is refused before its load): what
    a refiner must share with the model is the loaded UNet's, for each family's folder and file
    and an inpainting file; a pickled ``.ckpt`` is not read (its loaded UNet is checked)."""
    names = [f"{n}-{kind}" for n in FAMILIES for kind in ("folder", "file.safetensors")]
    for name in [*names, "inpaint.safetensors"]:
        await runtime.run(job(name), no_progress)
        loaded = runtime._cache[name].pipe.unet.config
        peeked = unet_config(runtime.catalog.resolve(name))
        assert peeked is not None and unlike(loaded, peeked) is None, name
        assert peeked["in_channels"] == loaded["in_channels"] == (9 if name.startswith("inpaint") else 4)
    (models_dir / "pickled.ckpt").write_bytes(b"not read")
    try:
        assert unet_config(runtime.catalog.resolve("pickled.ckpt")) is None
    finally:
        (models_dir / "pickled.ckpt").unlink()


def test_an_sdxl_refiner_is_told_apart() -> None:
    """It was refused as a file this runtime does not load; it loads now (as a refiner:
    ``test_sdxl_refiner.py``)."""
    shapes = {ldm.UNET_PREFIX + "input_blocks.0.0.weight": (384, 4, 3, 3)}
    shapes["conditioner.embedders.0.model.ln_final.weight"] = (1280,)
    assert family.detect(shapes) is family.Family.SDXL_REFINER


# Real models' configs (diffusers' own for SD 1.5, SD 2.1, SDXL base and refiner), the parts weights decide.
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
OPENCLIP_H = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
}
OPENCLIP_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
}
SD_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
REAL: dict[str, dict[str, Any]] = {
    "sd1": {"unet": {**SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8}, "text": [CLIP_L]},
    "sd2": {
        "unet": {
            **SD_UNET,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        },
        "text": [{**OPENCLIP_H, "hidden_act": "gelu"}],
    },
    "sdxl": {
        "unet": {
            "block_out_channels": [320, 640, 1280],
            "layers_per_block": 2,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10],
            "cross_attention_dim": 2048,
            "attention_head_dim": [5, 10, 20],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "text": [CLIP_L, {**OPENCLIP_G, "hidden_act": "gelu", "projection_dim": 1280}],
    },
    # Stability's sd_xl_refiner.yaml: 384 channels, attention at the middle two levels and the
    # middle block, 4 deep, 64-wide heads, OpenCLIP bigG's 1280 context, 2560 = 5 × 256 + 1280
    "sdxl-refiner": {
        "unet": {
            "block_out_channels": [384, 768, 1536, 1536],
            "layers_per_block": 2,
            "down_block_types": [
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": 4,
            "cross_attention_dim": 1280,
            "attention_head_dim": [6, 12, 24, 24],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2560,
        },
        "text": [{**OPENCLIP_G, "hidden_act": "gelu", "projection_dim": 1280}],
    },
}
VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4}


def real_size_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """A real-size checkpoint's names and shapes, written by sdfleet's LDM writers from models made
    on the meta device (no memory): what detection sees in the real file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    real = REAL[name]
    base = {"vocab_size": CLIP_VOCAB_SIZE, "max_position_embeddings": 77}
    state: dict[str, Any] = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**real["unet"])
        vae = AutoencoderKL(
            **VAE, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4
        )
        texts = [CLIPTextConfig(**base, **t) for t in real["text"]]
        encoders = [
            CLIPTextModelWithProjection(c) if c.projection_dim == 1280 else CLIPTextModel(c) for c in texts
        ]
    state |= ldm.unet_to_ldm(unet.state_dict(), unet.config) | ldm.vae_to_ldm(vae.state_dict(), vae.config)
    if name == "sd1":
        state |= ldm.clip_to_ldm(encoders[0].state_dict())
    elif name == "sd2":
        state |= ldm.openclip_to_ldm(encoders[0].state_dict(), ldm.OPENCLIP_PREFIX, extra_layer=True)
    elif name == "sdxl":
        state |= ldm.clip_to_ldm(encoders[0].state_dict(), ldm.SDXL_CLIP_PREFIX)
        state |= ldm.openclip_to_ldm(encoders[1].state_dict(), ldm.SDXL_OPENCLIP_PREFIX)
    else:
        state |= ldm.openclip_to_ldm(encoders[0].state_dict(), ldm.REFINER_OPENCLIP_PREFIX)
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("name", REAL)
def test_real_size_layouts_give_the_real_configs(name: str, tmp_path: Path) -> None:
    shapes = real_size_shapes(name)
    assert family.write_config_folder(shapes, tmp_path) == family.Family(name)
    unet = json.loads((tmp_path / "unet" / "config.json").read_text())
    for key, value in REAL[name]["unet"].items():
        assert unet[key] == value, key
    vae = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert {k: vae[k] for k in VAE} == VAE
    assert vae["scaling_factor"] == (0.13025 if name.startswith("sdxl") else 0.18215)
    for n, text in enumerate(REAL[name]["text"]):
        folder = f"text_encoder{'_2' if n or name == 'sdxl-refiner' else ''}"
        config = json.loads((tmp_path / folder / "config.json").read_text())
        expected = {"hidden_act": "quick_gelu", **text}
        assert {k: config[k] for k in expected} == expected
        tokenizer = json.loads(
            (tmp_path / folder.replace("text_encoder", "tokenizer") / "tokenizer_config.json").read_text()
        )
        assert tokenizer["pad_token"] == ("!" if config["hidden_act"] == "gelu" else "<|endoftext|>")
    index = json.loads((tmp_path / "model_index.json").read_text())
    pipelines = {"sdxl": "StableDiffusionXLPipeline", "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}
    assert index["_class_name"] == pipelines.get(name, "StableDiffusionPipeline")
    if name == "sdxl-refiner":  # its time ids end with the aesthetic score; one text encoder
        assert index["requires_aesthetics_score"] is True and index["text_encoder"] == [None, None]


def test_clip_tokenizer_is_built_offline(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    write_tokenizer(tmp_path, CLIP_VOCAB_SIZE, "!")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    # the ids CLIP's own tokenizer gives (openai/clip-vit-large-patch14)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.pad_token_id == 0 and tokenizer.model_max_length == 77


def test_sd2_v_prediction_is_tested_as_sd_webui_does() -> None:
    from diffusers import UNet2DConditionModel

    unet: Any = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    with torch.no_grad():
        unet.conv_out.bias.fill_(-10.0)  # answers far below its input: v-prediction
        assert is_v_prediction(unet)
        unet.conv_out.bias.fill_(10.0)
        assert not is_v_prediction(unet)
    assert _v_prediction(unet, {"v_pred": ()})  # ComfyUI's mark in the file
    assert not _v_prediction(unet, {})  # a tiny model: its random weights say nothing
    # an SD 2 inpainting UNet of real width is epsilon, untested (SD WebUI's config for it); the
    # test's 4-channel input would not even fit it
    inpainting: Any = type(
        "Unet", (), {"config": type("Config", (), {"in_channels": 9, "block_out_channels": (320,)})}
    )
    assert not _v_prediction(inpainting, {})
