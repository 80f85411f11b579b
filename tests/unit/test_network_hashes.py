"""The hash SD WebUI 1.10 gives a LoRA file (``Lora hashes`` in its infotexts): kohya's hash of a
safetensors file's tensor data, its ``sshs_model_hash`` where the metadata has one, a ``.pt``
file's own sha256. The real SD WebUI wrote the same hashes of these kinds of files (the issue note
says how it was run)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdfleet.models.network_hashes import lora_hash


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "lora_unet_x.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_x.alpha": torch.tensor(4.0),
    }


def test_a_safetensors_loras_hash_is_its_tensor_datas(tmp_path: Path) -> None:
    plain, named = tmp_path / "plain.safetensors", tmp_path / "named.safetensors"
    save_file(tensors(1), str(plain))
    save_file(tensors(1), str(named), metadata={"ss_output_name": "another name", "ss_note": "x" * 500})
    data = plain.read_bytes()
    body = data[8 + int.from_bytes(data[:8], "little") :]
    assert lora_hash(plain) == hashlib.sha256(body).hexdigest() != hashlib.sha256(data).hexdigest()
    assert lora_hash(named) == lora_hash(plain)  # the metadata is not hashed


def test_the_metadatas_own_hash_is_taken_and_a_pt_files_is_the_files(tmp_path: Path) -> None:
    given = tmp_path / "given.safetensors"
    save_file(tensors(2), str(given), metadata={"sshs_model_hash": "abcdef0123456789" * 4})
    assert lora_hash(given) == "abcdef0123456789" * 4
    pt = tmp_path / "old.pt"
    torch.save(tensors(3), pt)
    assert lora_hash(pt) == hashlib.sha256(pt.read_bytes()).hexdigest()


def test_a_changed_file_is_hashed_again(tmp_path: Path) -> None:
    path = tmp_path / "style.safetensors"
    save_file(tensors(4), str(path))
    first = lora_hash(path)
    save_file(tensors(5), str(path))
    os.utime(path, ns=(1, 1))  # another mtime even on a coarse clock
    assert lora_hash(path) != first
