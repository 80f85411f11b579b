"""Write an SD 1.5-shaped random-weight checkpoint that a real ComfyUI loads (for the interop suite).

    PYTHONPATH=src python tests/interop/comfyui_checkpoint.py /work/ext/comfyui/base/models/checkpoints

ComfyUI detects the model family from the state dict, so the tiny test model is refused ("Could not
detect model type"); SD 1.5 shapes (``sdfleet.models.random_sd15``) in the original LDM key layout
(``sdfleet.models.ldm``) load once CLIP's token embedding has CLIP's 49,408 rows (the locally
written tokenizer has fewer). Weights are random (images are noise), fp16, about 2.1 GB. Needs the
``diffusers`` extra; runs offline.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

CLIP_TOKENS = 49408
TOKEN_EMBEDDING = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def write_checkpoint(dest: Path, name: str = "random-sd15.safetensors", seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    from sdfleet.models.random_sd15 import NOTE, build_random_sd15
    from sdfleet.models.tiny import to_ldm_state_dict

    with tempfile.TemporaryDirectory() as scratch:
        pipe = build_random_sd15(seed, Path(scratch) / "tokenizer")
    state = to_ldm_state_dict(pipe)
    del pipe
    table = state[TOKEN_EMBEDDING]
    padded = torch.zeros(CLIP_TOKENS, table.shape[1], dtype=table.dtype)
    padded[: table.shape[0]] = table
    padded[table.shape[0] :] = torch.randn(CLIP_TOKENS - table.shape[0], table.shape[1]) * 0.02
    state[TOKEN_EMBEDDING] = padded
    state = {key: value.to(torch.float16).contiguous() for key, value in state.items()}
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / name
    save_file(state, str(path), metadata={"format": "pt", "sdfleet": json.dumps(NOTE)})
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="ComfyUI's models/checkpoints folder")
    parser.add_argument("--name", default="random-sd15.safetensors")
    args = parser.parse_args()
    print(write_checkpoint(args.dest, args.name))
