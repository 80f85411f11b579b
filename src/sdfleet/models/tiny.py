"""A tiny random-weight Stable Diffusion pipeline for demos and tests, written offline.

``make_tiny(dir, "tiny-sd")`` writes a diffusers folder ``dir/tiny-sd/`` (about 7 MB) that loads like
any SD 1.x model; ``sd2=True`` writes a tiny SD 2.x one (OpenCLIP-style text encoder, linear
attention projections), ``sdxl=True`` a tiny StableDiffusionXLPipeline (two text encoders, a
``text_time`` UNet), ``sdxl_refiner=True`` SDXL's refiner (encoder 2 alone, an aesthetic score
in its time ids). ``single_file=True`` writes instead ``dir/tiny-sd.safetensors`` in the original
key layout of its family (LDM, or SGM for SDXL), plus unless ``sidecar=False`` the diffusers config
folder ``dir/tiny-sd.config/`` (configs, tokenizers and scheduler, no weights) that
``from_single_file(..., config=..., local_files_only=True)`` reads to load it without the hub.

The tiny models follow the conventions of the real families where weights cannot tell (activation,
padding token, VAE scale, scheduler spacing), and for attention heads the rule
``sdfleet.models.family`` applies to models this small, so that a single file loads without its
config folder as the same model. Imports torch/diffusers/transformers when called.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

from sdfleet.models.clip_vocab import TINY_MERGES, write_vocab

MARKER = "sdfleet-tiny.json"
MARKER_CONTENT = {"tiny": True, "note": "random weights: output is noise from a tiny test model"}
CONFIG_SUFFIX = ".config"


def write_clip_vocab(dest: Path) -> tuple[Path, Path]:
    """A byte-level CLIP BPE vocabulary: every byte, every byte as a word end, a few merges."""
    return write_vocab(dest, TINY_MERGES)


_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
}
# Four VAE blocks give SD's 8x latent scale: a 2-block VAE (scale 2) makes 512x512 take minutes.
_VAE = {
    "block_out_channels": (8, 16, 32, 32),
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "sample_size": 64,
}
_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "max_position_embeddings": 77,
}
# SD 2.x's and SDXL's second encoder are OpenCLIP models: GELU, "!" as padding token.
_OPENCLIP_TEXT: dict[str, Any] = {**_TEXT, "hidden_act": "gelu"}
# Wider than encoder 1, as in SDXL (1280 vs 768): diffusers tells the two apart in a single file
# by width. Heads: 8 wide, as the tiny rule of sdfleet.models.family has it.
_TEXT_2: dict[str, Any] = {
    **_OPENCLIP_TEXT,
    "hidden_size": 64,
    "num_attention_heads": 8,
    "projection_dim": 32,
}
_OPENCLIP_PAD = "!"
# SDXL: the UNet attends to both encoders' hidden states side by side, and its added time embedding
# takes the pooled projection of encoder 2 plus six time ids (original size, crop, target size).
_SDXL_TIME_DIM = 8
_SDXL_UNET = {
    **_UNET,
    "cross_attention_dim": _TEXT["hidden_size"] + _TEXT_2["hidden_size"],
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _SDXL_TIME_DIM,
    "projection_class_embeddings_input_dim": 6 * _SDXL_TIME_DIM + _TEXT_2["projection_dim"],
}
# SDXL's refiner: encoder 2 alone, and five time ids (original size, crop, aesthetic score)
_REFINER_UNET = {
    **_SDXL_UNET,
    "cross_attention_dim": _TEXT_2["hidden_size"],
    "projection_class_embeddings_input_dim": 5 * _SDXL_TIME_DIM + _TEXT_2["projection_dim"],
}
_SD2_UNET = {**_UNET, "attention_head_dim": (2, 4), "use_linear_projection": True, "upcast_attention": True}
SDXL_VAE_SCALE = 0.13025
_XL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
"""SDXL's Euler, as diffusers ships it (its refiner's too)."""
_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def tokenizer_and_text_config(
    tmp: Path, text: dict[str, Any], pad_token: str = "<|endoftext|>"
) -> tuple[Any, Any]:
    """A CLIP tokenizer on the locally written byte vocabulary, and a text config sized to it."""
    import transformers

    t: Any = transformers  # untyped constructors, which mypy --strict refuses to call
    vocab_file, merges_file = write_clip_vocab(tmp)
    tokenizer = t.CLIPTokenizer(
        vocab=str(vocab_file), merges=str(merges_file), model_max_length=77, pad_token=pad_token
    )
    config = t.CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        **text,
    )
    return tokenizer, config


def _build_sdxl(seed: int, tmp: Path) -> Any:
    import diffusers
    import torch
    import transformers

    d: Any = diffusers
    t: Any = transformers
    tokenizer, text_config = tokenizer_and_text_config(tmp, _TEXT)
    tokenizer_2, text_config_2 = tokenizer_and_text_config(tmp, _TEXT_2, _OPENCLIP_PAD)
    torch.manual_seed(seed)
    return d.StableDiffusionXLPipeline(
        unet=d.UNet2DConditionModel(**_SDXL_UNET),
        vae=d.AutoencoderKL(**_VAE, scaling_factor=SDXL_VAE_SCALE),
        text_encoder=t.CLIPTextModel(text_config).eval(),
        text_encoder_2=t.CLIPTextModelWithProjection(text_config_2).eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=d.EulerDiscreteScheduler(**_XL_SCHEDULER),
        add_watermarker=False,
    )


def _build_sdxl_refiner(seed: int, tmp: Path) -> Any:
    import diffusers
    import torch
    import transformers

    d: Any = diffusers
    t: Any = transformers
    tokenizer_2, text_config_2 = tokenizer_and_text_config(tmp, _TEXT_2, _OPENCLIP_PAD)
    torch.manual_seed(seed)
    return d.StableDiffusionXLImg2ImgPipeline(
        unet=d.UNet2DConditionModel(**_REFINER_UNET),
        vae=d.AutoencoderKL(**_VAE, scaling_factor=SDXL_VAE_SCALE),
        text_encoder=None,
        text_encoder_2=t.CLIPTextModelWithProjection(text_config_2).eval(),
        tokenizer=None,
        tokenizer_2=tokenizer_2,
        scheduler=d.EulerDiscreteScheduler(**_XL_SCHEDULER),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=True,  # as SD WebUI's conditioner makes an empty negative prompt
        add_watermarker=False,
    )


def _build_sd2(seed: int, tmp: Path) -> Any:
    return _build(seed, tmp, sd2=True)


def _build(seed: int, tmp: Path, sd2: bool = False) -> Any:
    import diffusers
    import torch
    import transformers

    # Typed as Any: their constructors are untyped, which mypy --strict refuses to call.
    d: Any = diffusers
    t: Any = transformers

    if sd2:
        tokenizer, text_config = tokenizer_and_text_config(tmp, _OPENCLIP_TEXT, _OPENCLIP_PAD)
    else:
        tokenizer, text_config = tokenizer_and_text_config(tmp, _TEXT)
    torch.manual_seed(seed)
    return d.StableDiffusionPipeline(
        unet=d.UNet2DConditionModel(**(_SD2_UNET if sd2 else _UNET)),
        vae=d.AutoencoderKL(**_VAE),
        text_encoder=t.CLIPTextModel(text_config).eval(),
        tokenizer=tokenizer,
        scheduler=d.DDIMScheduler(**_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _write_config_folder(pipe: Any, dest: Path) -> None:
    """Everything ``from_single_file(config=dest)`` reads: model_index, component configs, tokenizers."""
    pipe.save_config(dest)
    for name, component in pipe.components.items():
        if component is None:
            continue
        if hasattr(component, "save_pretrained") and not hasattr(component, "state_dict"):
            component.save_pretrained(dest / name)  # tokenizers, schedulers
        elif hasattr(component, "save_config"):
            component.save_config(dest / name)  # diffusers models
        else:
            component.config.save_pretrained(dest / name)  # transformers models


def to_ldm_state_dict(pipe: Any) -> dict[str, Any]:
    """The pipeline's UNet, VAE and text encoder weights in its family's single-file key layout."""
    from sdfleet.models import ldm

    state: dict[str, Any] = {}
    state.update(ldm.unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    state.update(ldm.vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if pipe.text_encoder is None:  # SDXL's refiner
        state.update(ldm.openclip_to_ldm(pipe.text_encoder_2.state_dict(), ldm.REFINER_OPENCLIP_PREFIX))
        return {k: v.detach().contiguous() for k, v in state.items()}
    text = pipe.text_encoder.state_dict()
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL
        state.update(ldm.clip_to_ldm(text, ldm.SDXL_CLIP_PREFIX))
        state.update(ldm.openclip_to_ldm(pipe.text_encoder_2.state_dict(), ldm.SDXL_OPENCLIP_PREFIX))
    elif pipe.text_encoder.config.hidden_act == "gelu":  # SD 2.x: OpenCLIP
        state.update(ldm.openclip_to_ldm(text, ldm.OPENCLIP_PREFIX, extra_layer=True))
    else:
        state.update(ldm.clip_to_ldm(text))
    return {k: v.detach().contiguous() for k, v in state.items()}


def is_tiny(path: Path) -> bool:
    """Whether ``path`` is something ``make_tiny`` wrote: a folder with the marker file (a
    diffusers folder or a single file's config folder), or a ``.safetensors`` whose metadata
    carries the marker. Anything else, unreadable included, is taken for a real model."""
    if path.is_dir():
        return (path / MARKER).is_file()
    return file_marker(path) is not None


def file_marker(path: Path) -> dict[str, Any] | None:
    """The marker ``make_tiny`` put in a single file's metadata, None for any other file (a real
    checkpoint, an unreadable one). Read once per version of the file (its size and mtime): the
    catalog asks on every listing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return _file_marker(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_marker(path: str, _size: int, _mtime_ns: int) -> dict[str, Any] | None:
    if not path.endswith(".safetensors"):
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, "np") as f:
            marker = (f.metadata() or {}).get("sdfleet")
        found = json.loads(marker) if marker is not None else None
    except Exception:  # not a safetensors file we can read: not ours, whatever it is
        return None
    return found if isinstance(found, dict) else None


def make_tiny(
    dest_dir: Path,
    name: str,
    *,
    seed: int = 0,
    single_file: bool = False,
    sdxl: bool = False,
    sd2: bool = False,
    sidecar: bool = True,
    sdxl_refiner: bool = False,
) -> Path:
    """Write a tiny random-weight SD 1.x, 2.x or SDXL pipeline, or SDXL's refiner (an SDXL
    image-to-image pipeline of encoder 2 alone); returns the folder, or the ``.safetensors``
    (with its ``.config/`` folder unless ``sidecar`` is false)."""
    from safetensors.torch import save_file

    if sum((sdxl, sd2, sdxl_refiner)) > 1:
        raise ValueError("a tiny model is of one family: SD 2.x, SDXL or SDXL's refiner")
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"{name!r} is not a model name (one file or folder name, not starting with .)")
    if single_file:  # a task may name the model with or without its extension: one is enough
        name = name.removesuffix(".safetensors").removesuffix(".ckpt") or name
    dest_dir = Path(dest_dir)
    targets = [dest_dir / f"{name}.safetensors"] if single_file else [dest_dir / name]
    if single_file and sidecar:
        targets.append(dest_dir / f"{name}{CONFIG_SUFFIX}")
    for target in targets:
        if target.exists() and not is_tiny(target):  # a real model of that name: never written over
            raise ValueError(f"{target} exists and is not a tiny test model; give another name")
    dest_dir.mkdir(parents=True, exist_ok=True)
    scratch = dest_dir / f".{name}.tokenizer-src"
    try:
        build = (
            _build_sdxl if sdxl else _build_sdxl_refiner if sdxl_refiner else _build_sd2 if sd2 else _build
        )
        pipe = build(seed, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    marker = json.dumps(MARKER_CONTENT)
    if not single_file:
        folder = dest_dir / name
        pipe.save_pretrained(folder, safe_serialization=True)
        (folder / MARKER).write_text(marker)
        return folder
    if sidecar:
        config_dir = dest_dir / f"{name}{CONFIG_SUFFIX}"
        _write_config_folder(pipe, config_dir)
        (config_dir / MARKER).write_text(marker)
    path = dest_dir / f"{name}.safetensors"
    save_file(to_ldm_state_dict(pipe), str(path), metadata={"format": "pt", "sdfleet": marker})
    return path
