"""A tiny random-weight Stable Diffusion pipeline for demos and tests, written offline.

``make_tiny(dir, "tiny-sd")`` writes a diffusers folder ``dir/tiny-sd/`` (about 7 MB) that loads like
any SD 1.x model; ``sdxl=True`` writes a tiny StableDiffusionXLPipeline folder instead (two text
encoders, a ``text_time`` UNet). ``single_file=True`` writes instead ``dir/tiny-sd.safetensors`` in
the original (LDM) key layout, plus the diffusers config folder ``dir/tiny-sd.config/`` (configs,
tokenizer and scheduler, no weights) that ``from_single_file(..., config=..., local_files_only=True)``
needs to load it without the hub. Imports torch/diffusers/transformers when called.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

MARKER = "sdfleet-tiny.json"
MARKER_CONTENT = {"tiny": True, "note": "random weights: output is noise from a tiny test model"}
CONFIG_SUFFIX = ".config"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable character table (every byte gets a one-character token)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def write_clip_vocab(dest: Path) -> tuple[Path, Path]:
    """A byte-level CLIP BPE vocabulary: every byte, every byte as a word end, a few merges."""
    dest.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>"), ("e", "r</w>")]
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = dest / "vocab.json", dest / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_file, merges_file


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
_TEXT_2 = {**_TEXT, "projection_dim": 32}
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
_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def tokenizer_and_text_config(tmp: Path, text: dict[str, Any]) -> tuple[Any, Any]:
    """A CLIP tokenizer on the locally written byte vocabulary, and a text config sized to it."""
    import transformers

    t: Any = transformers  # untyped constructors, which mypy --strict refuses to call
    vocab_file, merges_file = write_clip_vocab(tmp)
    tokenizer = t.CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=77)
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
    tokenizer_2, text_config_2 = tokenizer_and_text_config(tmp, _TEXT_2)
    torch.manual_seed(seed)
    return d.StableDiffusionXLPipeline(
        unet=d.UNet2DConditionModel(**_SDXL_UNET),
        vae=d.AutoencoderKL(**_VAE),
        text_encoder=t.CLIPTextModel(text_config).eval(),
        text_encoder_2=t.CLIPTextModelWithProjection(text_config_2).eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=d.EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
        add_watermarker=False,
    )


def _build(seed: int, tmp: Path) -> Any:
    import diffusers
    import torch
    import transformers

    # Typed as Any: their constructors are untyped, which mypy --strict refuses to call.
    d: Any = diffusers
    t: Any = transformers

    tokenizer, text_config = tokenizer_and_text_config(tmp, _TEXT)
    torch.manual_seed(seed)
    return d.StableDiffusionPipeline(
        unet=d.UNet2DConditionModel(**_UNET),
        vae=d.AutoencoderKL(**_VAE),
        text_encoder=t.CLIPTextModel(text_config).eval(),
        tokenizer=tokenizer,
        scheduler=d.DDIMScheduler(**_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _write_config_folder(pipe: Any, dest: Path) -> None:
    """Everything ``from_single_file(config=dest)`` reads: model_index, component configs, tokenizer."""
    pipe.save_config(dest)
    pipe.unet.save_config(dest / "unet")
    pipe.vae.save_config(dest / "vae")
    pipe.text_encoder.config.save_pretrained(dest / "text_encoder")
    pipe.tokenizer.save_pretrained(dest / "tokenizer")
    pipe.scheduler.save_pretrained(dest / "scheduler")


def to_ldm_state_dict(pipe: Any) -> dict[str, Any]:
    """The pipeline's UNet, VAE and text encoder weights in the original single-file key layout."""
    from sdfleet.models.ldm import clip_to_ldm, unet_to_ldm, vae_to_ldm

    state: dict[str, Any] = {}
    state.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    state.update(clip_to_ldm(pipe.text_encoder.state_dict()))
    return {k: v.detach().contiguous() for k, v in state.items()}


def make_tiny(
    dest_dir: Path, name: str, *, seed: int = 0, single_file: bool = False, sdxl: bool = False
) -> Path:
    """Write a tiny random-weight SD (or SDXL) pipeline; returns the folder, or the ``.safetensors``.

    Raises ``ValueError`` for ``sdxl`` with ``single_file`` (no SDXL LDM key layout writer).
    """
    from safetensors.torch import save_file

    if sdxl and single_file:
        raise ValueError("a tiny SDXL model is written as a diffusers folder only (no single file)")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    scratch = dest_dir / f".{name}.tokenizer-src"
    try:
        pipe = (_build_sdxl if sdxl else _build)(seed, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    marker = json.dumps(MARKER_CONTENT)
    if not single_file:
        folder = dest_dir / name
        pipe.save_pretrained(folder, safe_serialization=True)
        (folder / MARKER).write_text(marker)
        return folder
    config_dir = dest_dir / f"{name}{CONFIG_SUFFIX}"
    _write_config_folder(pipe, config_dir)
    (config_dir / MARKER).write_text(marker)
    path = dest_dir / f"{name}.safetensors"
    save_file(to_ldm_state_dict(pipe), str(path), metadata={"format": "pt", "sdfleet": marker})
    return path
