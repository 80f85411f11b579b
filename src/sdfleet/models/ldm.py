"""Diffusers → original (LDM/CompVis, SGM) state-dict key layout for Stable Diffusion checkpoints.

The inverse of what ``diffusers.loaders.single_file_utils`` does when it reads a single-file
checkpoint, derived from the UNet/VAE configs so it works for any block count (the tiny test
models included), not only the 4-block SD 1.5 layout. Values are passed through untouched except
the VAE mid-block attention projections, which LDM stores as 1×1 convolutions, and OpenCLIP's
fused attention projections (SD 2.x's text encoder, SDXL's second).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."
"""SDXL's refiner has only the OpenCLIP encoder, as its first embedder."""

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's size and crop conditioning
    "add_embedding.linear_2.": "label_emb.0.2.",
}
_UNET_RESNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
]
_VAE_ATTN = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
]


def _unet_prefix_map(config: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, ldm prefix, is_resnet) for every block of the UNet."""
    per = int(config["layers_per_block"])
    n = len(config["down_block_types"])
    out: list[tuple[str, str, bool]] = []
    for b in range(n):
        for j in range(per):
            i = 1 + b * (per + 1) + j
            out.append((f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{i}.0.", True))
            out.append((f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{i}.1.", False))
        if b < n - 1:
            out.append(
                (
                    f"down_blocks.{b}.downsamplers.0.conv.",
                    f"input_blocks.{1 + b * (per + 1) + per}.0.op.",
                    False,
                )
            )
    out.append(("mid_block.resnets.0.", "middle_block.0.", True))
    out.append(("mid_block.attentions.0.", "middle_block.1.", False))
    out.append(("mid_block.resnets.1.", "middle_block.2.", True))
    for b, block_type in enumerate(config["up_block_types"]):
        for j in range(per + 1):
            i = b * (per + 1) + j
            out.append((f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{i}.0.", True))
            out.append((f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{i}.1.", False))
        if b < n - 1:
            slot = 2 if "CrossAttn" in block_type else 1
            out.append(
                (
                    f"up_blocks.{b}.upsamplers.0.conv.",
                    f"output_blocks.{b * (per + 1) + per}.{slot}.conv.",
                    False,
                )
            )
    return out


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def unet_to_ldm(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    prefixes = _unet_prefix_map(config)
    out: dict[str, Any] = {}
    for key, value in state.items():
        new = _rename(key, list(_UNET_TOP.items()))
        if new == key:
            for d_prefix, l_prefix, is_resnet in prefixes:
                if key.startswith(d_prefix):
                    rest = key[len(d_prefix) :]
                    new = l_prefix + (_rename(rest, _UNET_RESNET) if is_resnet else rest)
                    break
            else:
                raise ValueError(f"no LDM name for UNet key {key!r}")
        out[UNET_PREFIX + new] = value
    return out


def _vae_prefix_map(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    n = len(config["down_block_types"])
    per = int(config["layers_per_block"])
    out: list[tuple[str, str]] = []
    for i in range(n):
        for j in range(per):
            out.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        out.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."))
        for j in range(per + 1):
            out.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}."))
        out.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv."))
    for part in ("encoder", "decoder"):
        out.append((f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."))
        out.append((f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."))
        out.append((f"{part}.conv_norm_out.", f"{part}.norm_out."))
    return out


def vae_to_ldm(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    table = _vae_prefix_map(config)
    out: dict[str, Any] = {}
    for key, value in state.items():
        new, tensor = key, value
        for part in ("encoder", "decoder"):
            attn = f"{part}.mid_block.attentions.0."
            if key.startswith(attn):
                new = f"{part}.mid.attn_1." + _rename(key[len(attn) :], _VAE_ATTN)
                if tensor.ndim == 2:
                    tensor = tensor[:, :, None, None]  # LDM keeps these as 1x1 convolutions
        if new == key:
            new = _rename(key, table).replace("conv_shortcut.", "nin_shortcut.")
        out[VAE_PREFIX + new] = tensor
    return out


def clip_to_ldm(state: Mapping[str, Any], prefix: str = CLIP_PREFIX) -> dict[str, Any]:
    # transformers ≥ 5.6 flattened CLIPTextModel (no ``text_model.`` level); LDM files always have it.
    return {prefix + key.removeprefix("text_model."): value for key, value in state.items()}


_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = [
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
]


def openclip_to_ldm(state: Mapping[str, Any], prefix: str, *, extra_layer: bool = False) -> dict[str, Any]:
    """A transformers CLIP text encoder in OpenCLIP's layout (``transformer.resblocks.N.attn.in_proj``).

    ``text_projection`` is stored transposed, as OpenCLIP does; a model without one (SD 2.x's) gets
    an identity, as its files carry one that nothing reads. ``extra_layer`` repeats the last layer
    as one more: SD 2.x files hold all 24 layers of OpenCLIP ViT-H, of which the model uses 23.
    """
    flat = {key.removeprefix("text_model."): value for key, value in state.items()}
    out: dict[str, Any] = {}
    layers: dict[int, dict[str, Any]] = {}
    for key, value in flat.items():
        if key in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            number, rest = key.removeprefix("encoder.layers.").split(".", 1)
            layers.setdefault(int(number), {})[rest] = value
        else:
            raise ValueError(f"no OpenCLIP name for text encoder key {key!r}")
    if prefix + "text_projection" not in out:
        width = flat["final_layer_norm.weight"].shape[0]
        out[prefix + "text_projection"] = _eye_like(flat["final_layer_norm.weight"], width)
    if extra_layer:
        layers[len(layers)] = {k: v.clone() for k, v in layers[len(layers) - 1].items()}
    for n, layer in layers.items():
        out.update(_openclip_layer(layer, f"{prefix}transformer.resblocks.{n}."))
    return out


def _openclip_layer(layer: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for kind in ("weight", "bias"):
        parts = [layer[f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    for rest, value in layer.items():
        if not rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
            out[prefix + _rename(rest, _OPENCLIP_LAYER)] = value
    return out


def _eye_like(like: Any, width: int) -> Any:
    import torch

    return torch.eye(width, dtype=like.dtype)
