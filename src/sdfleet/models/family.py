"""Which Stable Diffusion family a single-file checkpoint is, from its tensor names and shapes, and
the diffusers config folder that loads it offline (no hub, no config folder next to it).

Families are told apart as SD WebUI does (``modules/sd_models_config.py``): SDXL has a second,
OpenCLIP text encoder (``conditioner.embedders.1.model.*``), SDXL's refiner that one alone
(``conditioner.embedders.0.model.*``), SD 2.x one OpenCLIP encoder
(``cond_stage_model.model.*``, 1024 wide), SD 1.x a transformers CLIP one
(``cond_stage_model.transformer.*``, 768 wide). The components' configs come from the shapes (widths,
depths, block layout, vocabulary) plus what the family fixes and weights cannot tell: activations,
attention heads, padding token, VAE scale, scheduler. Models narrower than any real one (the tiny
test models) take the tiny builder's head widths. Imports no torch: shapes come from the file's
safetensors header (``read_shapes``) or from a loaded state dict.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from sdfleet.models import ldm
from sdfleet.models.clip_vocab import write_tokenizer

Shapes = Mapping[str, tuple[int, ...]]
UNET = ldm.UNET_PREFIX
VAE = ldm.VAE_PREFIX
REAL_WIDTH = 320
"""The narrowest real SD UNet's first block; narrower models follow the tiny builder's heads."""
_MAX_HEADER = 100 * 2**20


class Family(StrEnum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl-refiner"
    """SDXL's refiner: its OpenCLIP encoder alone, an aesthetic score in its time ids."""


XL = (Family.SDXL, Family.SDXL_REFINER)


class UnsupportedCheckpoint(ValueError):
    """A single file this runtime cannot load without a config folder (the reason says why)."""


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from a ``.safetensors`` header, without reading the tensors."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > _MAX_HEADER:
            raise UnsupportedCheckpoint(f"{path.name}: safetensors header of {length} bytes")
        header = json.loads(f.read(length))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def detect(shapes: Shapes) -> Family:
    """The family of a checkpoint. Raises ``UnsupportedCheckpoint`` for anything else."""
    unet_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if unet_in is None:
        raise UnsupportedCheckpoint("no Stable Diffusion UNet (model.diffusion_model.*) in it")
    if ldm.SDXL_OPENCLIP_PREFIX + "ln_final.weight" in shapes:
        family = Family.SDXL
    elif ldm.REFINER_OPENCLIP_PREFIX + "ln_final.weight" in shapes:
        family = Family.SDXL_REFINER
    elif ldm.OPENCLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight" in shapes:
        family = Family.SD2
    elif ldm.CLIP_PREFIX + "embeddings.token_embedding.weight" in shapes:
        family = Family.SD1
    else:
        raise UnsupportedCheckpoint("a UNet with no text encoder SD 1.x, 2.x or SDXL has")
    if unet_in[1] not in (4, 9):  # 9: an inpainting model (latents, mask, masked input)
        kind = {8: "an instruct-pix2pix model"}.get(unet_in[1], "a UNet")
        raise UnsupportedCheckpoint(f"{kind} ({unet_in[1]} input channels; 4 and 9 are supported)")
    return family


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """The N of every ``prefix + "N."`` key, sorted."""
    found = {int(k[len(prefix) :].split(".", 1)[0]) for k in shapes if k.startswith(prefix)}
    return sorted(found)


def _groups(channels: list[int]) -> int:
    return min(32, math.gcd(*channels))


def _unet_levels(shapes: Shapes) -> list[tuple[int, int, int]]:
    """(channels, resnets, transformer depth) per level, from the UNet's input blocks."""
    levels: list[list[int]] = [[0, 0, 0]]
    for i in _indices(shapes, UNET + "input_blocks.")[1:]:
        block = f"{UNET}input_blocks.{i}."
        if block + "0.op.weight" in shapes:
            levels.append([0, 0, 0])
            continue
        level = levels[-1]
        level[0] = shapes[block + "0.out_layers.3.weight"][0]
        level[1] += 1
        level[2] = max(level[2], len(_indices(shapes, block + "1.transformer_blocks.")))
    return [(c, r, d) for c, r, d in levels]


def unet_config(shapes: Shapes, family: Family) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of the checkpoint's UNet."""
    levels = _unet_levels(shapes)
    channels = [c for c, _, _ in levels]
    depths = [d for _, _, d in levels]
    # diffusers gives the middle block the last level's depth: the refiner's last level has no
    # attention (its depth stands for the middle block's), SDXL's has the middle block's
    mid = len(_indices(shapes, UNET + "middle_block.1.transformer_blocks.")) or 1
    layers = [d or 1 for d in depths[:-1]] + [depths[-1] or mid]
    if len({d for d in depths if d} | {mid}) == 1:
        layers = [mid]
    attn = next(k for k in shapes if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in shapes if k.startswith(UNET) and k.endswith(".1.proj_in.weight"))
    config: dict[str, Any] = {
        "sample_size": {Family.SD1: 64, Family.SD2: 96}.get(family, 128),
        "in_channels": shapes[UNET + "input_blocks.0.0.weight"][1],
        "out_channels": shapes[UNET + "out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": levels[0][1],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        "transformer_layers_per_block": layers if len(set(layers)) > 1 else layers[0],
        "cross_attention_dim": shapes[attn][1],
        "use_linear_projection": len(shapes[proj_in]) == 2,
        "norm_num_groups": _groups(channels),
        "attention_head_dim": 8 if family is Family.SD1 else [c // _head_width(channels) for c in channels],
    }
    if family is Family.SD2:
        config["upcast_attention"] = True  # fp16 attention of SD 2.x overflows (diffusers' own config)
    if family in XL:
        embed_in = shapes[UNET + "label_emb.0.0.weight"][1]
        refiner = family is Family.SDXL_REFINER
        pooled = shapes[
            (ldm.REFINER_OPENCLIP_PREFIX if refiner else ldm.SDXL_OPENCLIP_PREFIX) + "text_projection"
        ][1]
        # six size and crop numbers then the pooled text; the refiner's five: sizes, crop, aesthetic score
        config |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": (embed_in - pooled) // (5 if refiner else 6),
            "projection_class_embeddings_input_dim": embed_in,
        }
    return config


def _head_width(channels: list[int]) -> int:
    return 64 if channels[0] >= REAL_WIDTH else 16


def vae_config(shapes: Shapes, family: Family) -> dict[str, Any]:
    """The ``AutoencoderKL`` config of the checkpoint's VAE."""
    levels = _indices(shapes, VAE + "encoder.down.")
    channels = [shapes[f"{VAE}encoder.down.{i}.block.0.conv1.weight"][0] for i in levels]
    return {
        "in_channels": shapes[VAE + "encoder.conv_in.weight"][1],
        "out_channels": shapes[VAE + "decoder.conv_out.weight"][0],
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "layers_per_block": len(_indices(shapes, VAE + "encoder.down.0.block.")),
        "latent_channels": shapes[VAE + "encoder.conv_out.weight"][0] // 2,
        "norm_num_groups": _groups(channels),
        "sample_size": {Family.SD1: 512, Family.SD2: 768}.get(family, 1024),
        "scaling_factor": 0.13025 if family in XL else 0.18215,
    }


def clip_config(shapes: Shapes, prefix: str, *, openclip: bool, drop_last: bool = False) -> dict[str, Any]:
    """The ``CLIPTextConfig`` of a text encoder in the transformers or the OpenCLIP layout."""
    if openclip:
        vocab, hidden = shapes[prefix + "token_embedding.weight"]
        positions = shapes[prefix + "positional_embedding"][0]
        layers = len(_indices(shapes, prefix + "transformer.resblocks."))
        inner = shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
    else:
        vocab, hidden = shapes[prefix + "embeddings.token_embedding.weight"]
        positions = shapes[prefix + "embeddings.position_embedding.weight"][0]
        layers = len(_indices(shapes, prefix + "encoder.layers."))
        inner = shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0]
    config: dict[str, Any] = {
        "architectures": ["CLIPTextModel"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inner,
        "num_hidden_layers": layers - 1 if drop_last else layers,
        "num_attention_heads": hidden // (64 if hidden >= 256 else 8),
        "max_position_embeddings": positions,
        "hidden_act": "gelu" if openclip else "quick_gelu",
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": 0 if openclip else vocab - 1,  # "!" or <|endoftext|>
    }
    projection = shapes.get(prefix + "text_projection")
    if openclip and projection is not None and not drop_last:
        config |= {"architectures": ["CLIPTextModelWithProjection"], "projection_dim": projection[1]}
    return config


def scheduler_config(family: Family, v_prediction: bool = False) -> dict[str, Any]:
    """The family's scheduler as diffusers ships it (PNDM for SD 1.x/2.x, Euler for SDXL and its
    refiner)."""
    config: dict[str, Any] = {
        "_class_name": "EulerDiscreteScheduler" if family in XL else "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction" if v_prediction else "epsilon",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "clip_sample": False,
    }
    return config


def write_config_folder(shapes: Shapes, dest: Path) -> Family:
    """Write the diffusers config folder (no weights) of the checkpoint; returns its family."""
    family = detect(shapes)
    try:
        _write(shapes, dest, family)
    except (KeyError, StopIteration, IndexError) as e:
        raise UnsupportedCheckpoint(f"a {family.value} checkpoint without the tensor {e}") from e
    return family


def _write(shapes: Shapes, dest: Path, family: Family) -> None:
    encoders: dict[str, tuple[dict[str, Any], str]] = {}
    if family is Family.SD1:
        encoders["text_encoder"] = (clip_config(shapes, ldm.CLIP_PREFIX, openclip=False), "<|endoftext|>")
    elif family is Family.SD2:
        encoders["text_encoder"] = (
            clip_config(shapes, ldm.OPENCLIP_PREFIX, openclip=True, drop_last=True),
            "!",
        )
    elif family is Family.SDXL:
        encoders["text_encoder"] = (
            clip_config(shapes, ldm.SDXL_CLIP_PREFIX, openclip=False),
            "<|endoftext|>",
        )
        encoders["text_encoder_2"] = (clip_config(shapes, ldm.SDXL_OPENCLIP_PREFIX, openclip=True), "!")
    else:
        encoders["text_encoder_2"] = (clip_config(shapes, ldm.REFINER_OPENCLIP_PREFIX, openclip=True), "!")
    scheduler = scheduler_config(family)
    index: dict[str, Any] = {
        "_class_name": _PIPELINES[family],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler["_class_name"]],
    }
    _json(
        dest / "unet" / "config.json", {"_class_name": "UNet2DConditionModel", **unet_config(shapes, family)}
    )
    _json(dest / "vae" / "config.json", {"_class_name": "AutoencoderKL", **vae_config(shapes, family)})
    _json(dest / "scheduler" / "scheduler_config.json", scheduler)
    for name, (config, pad) in encoders.items():
        tokenizer = name.replace("text_encoder", "tokenizer")
        _json(dest / name / "config.json", {"model_type": "clip_text_model", **config})
        write_tokenizer(dest / tokenizer, config["vocab_size"], pad, config["max_position_embeddings"])
        index[name] = ["transformers", config["architectures"][0]]
        index[tokenizer] = ["transformers", "CLIPTokenizer"]
    if family is Family.SDXL_REFINER:  # zeros for an empty negative prompt, as SD WebUI's conditioner
        index |= {"text_encoder": [None, None], "tokenizer": [None, None], "requires_aesthetics_score": True}
    if family in XL:
        index |= {"force_zeros_for_empty_prompt": True}
    else:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None]}
        index["requires_safety_checker"] = False
    _json(dest / "model_index.json", index)


_PIPELINES = {
    Family.SD1: "StableDiffusionPipeline",
    Family.SD2: "StableDiffusionPipeline",
    Family.SDXL: "StableDiffusionXLPipeline",
    Family.SDXL_REFINER: "StableDiffusionXLImg2ImgPipeline",
}


def _json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))
