"""Single-file checkpoints without a config folder next to them (the seed's default,
``sd_xl_turbo_1.0.safetensors``, comes so): the family is read from the state dict
(``sdfleet.models.family``), its config folder is written to a temporary folder, and diffusers
loads the file with it, offline. Imports torch and diffusers.

SD 2.x comes in two kinds the weights cannot tell apart by shape: 768-pixel v-prediction models and
512-pixel epsilon ones. As SD WebUI does (``is_using_v_parameterization_for_sd2``), the loaded UNet
is run once on a constant input: a v-prediction model answers far below it. A ``v_pred`` tensor in
the file (ComfyUI's mark) says v-prediction outright.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import diffusers as _diffusers_module
import torch

from sdfleet.models import family as F
from sdfleet.models.catalog import ModelInfo

log = logging.getLogger(__name__)
diffusers: Any = _diffusers_module


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape: from the safetensors header, or by mapping a pickled checkpoint."""
    if path.suffix == ".safetensors":
        return F.read_shapes(path)
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}
    return {str(k): tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_detected(info: ModelInfo, dtype: torch.dtype) -> Any:
    """The pipeline of a single-file checkpoint of any supported family, loaded offline.

    Raises ``family.UnsupportedCheckpoint`` for a file of another kind.
    """
    shapes = read_shapes(info.path)
    with tempfile.TemporaryDirectory(prefix="sdfleet-config-") as config:
        family = F.write_config_folder(shapes, Path(config))
        index = json.loads((Path(config) / "model_index.json").read_text())
        cls = getattr(diffusers, index["_class_name"])
        pipe = cls.from_single_file(str(info.path), config=config, dtype=dtype, local_files_only=True)
    v_prediction = family is F.Family.SD2 and _v_prediction(pipe.unet, shapes)
    if v_prediction:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type="v_prediction"
        )
    kind = f"{family.value}{' v-prediction' if v_prediction else ''}"
    log.info("%s has no config folder: detected %s from its weights", info.name, kind)
    return pipe


def _v_prediction(unet: Any, shapes: F.Shapes) -> bool:
    if "v_pred" in shapes:
        return True
    if unet.config.in_channels != 4:  # SD 2 inpainting: epsilon, as SD WebUI's config for it says
        return False
    if unet.config.block_out_channels[0] < F.REAL_WIDTH:
        return False  # a tiny test model's random weights say nothing
    return is_v_prediction(unet)


def is_v_prediction(unet: Any) -> bool:
    """SD WebUI's test: at t=999 on a constant 0.5 input, a v-prediction UNet answers below it by
    more than 1 on average, an epsilon one does not."""
    param = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=param.device, dtype=param.dtype)
    timestep = torch.tensor([999], device=param.device)
    with torch.inference_mode():
        out = unet(x, timestep, encoder_hidden_states=context).sample
    return bool((out.float() - x.float()).mean().item() < -1)
