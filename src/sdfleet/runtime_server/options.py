"""SD WebUI's settings (``/sdapi/v1/options``): its ~310 keys with 1.10.1's defaults.

Every key SD WebUI has is listed and can be set (clients read and write them freely), but only
these change what this server does: ``sd_model_checkpoint`` (loads the model),
``CLIP_stop_at_last_layers`` (clip skip of jobs that do not override it), ``emphasis`` (how
prompts' brackets are read, likewise), ``tiling``, ``hires_fix_refiner_pass`` and
``refiner_switch_by_sample_steps`` (how a refiner takes over, likewise), ``s_min_uncond``,
``s_min_uncond_all`` and ``skip_early_cond`` (which passes leave the negative prompt out),
``initial_noise_multiplier`` (image-to-image's noise), and
``add_model_hash_to_info`` / ``add_model_name_to_info`` / ``add_version_to_infotext`` /
``lora_add_hashes_to_infotext`` / ``textual_inversion_add_hashes_to_infotext`` /
``enable_pnginfo`` (what goes into infotexts and PNG text). Unknown keys are refused as SD WebUI
refuses them (``KeyError``), with 422 instead of its 500.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

from sdfleet.runtime_server.errors import failed

CLIP_SKIP = "CLIP_stop_at_last_layers"


def _defaults() -> dict[str, Any]:
    text = resources.files("sdfleet.runtime_server").joinpath("data/options.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def cmd_flags_template() -> dict[str, Any]:
    """SD WebUI 1.10.1's command-line flags (``/sdapi/v1/cmd-flags``), its paths left out."""
    text = resources.files("sdfleet.runtime_server").joinpath("data/cmd_flags.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


class Options:
    """The settings, SD WebUI's defaults first; ``data`` holds what clients set."""

    def __init__(self) -> None:
        self.defaults = _defaults()
        self.data: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        return self.data.get(key, self.defaults.get(key))

    def check(self, body: dict[str, Any]) -> None:
        """Refuse a key SD WebUI does not have, before anything is changed."""
        for key in body:
            if key not in self.defaults:
                raise failed(422, "KeyError", repr(key), sdwebui=500)

    def update(self, body: dict[str, Any]) -> None:
        self.check(body)
        self.data.update(copy.deepcopy(body))

    def clip_skip(self) -> int:
        return clip_skip_value(self[CLIP_SKIP])

    def listing(self, checkpoint: str | None, sha256: str | None) -> dict[str, Any]:
        out = {**copy.deepcopy(self.defaults), **copy.deepcopy(self.data)}
        out["sd_model_checkpoint"] = checkpoint
        out["sd_checkpoint_hash"] = sha256
        # SD WebUI answers a slider's value as a float once it has been set (null as posted: a
        # job then refuses it, see clip_skip_value).
        if isinstance(out[CLIP_SKIP], int | float) and not isinstance(out[CLIP_SKIP], bool):
            out[CLIP_SKIP] = float(out[CLIP_SKIP])
        return out


def clip_skip_value(value: Any) -> int:
    """A clip-skip setting as an int in 1..12; ``SdApiError`` for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise failed(422, "ValueError", f"{CLIP_SKIP} must be a whole number from 1 to 12, not {value!r}")
    if not 1 <= int(value) <= 12:
        raise failed(422, "ValueError", f"{CLIP_SKIP} must be from 1 to 12, not {value!r}")
    return int(value)
