"""Model catalog and tiny-model builder, including offline single-file loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from sdfleet.errors import NotFound
from sdfleet.models import ModelCatalog, make_tiny
from sdfleet.models.catalog import default_model
from sdfleet.models.tiny import MARKER


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny(root, "v1-5-pruned-emaonly")
    make_tiny(root, "tiny-sf", single_file=True)
    make_tiny(root, "sf-bare", single_file=True, sidecar=False)  # the marker in its metadata alone
    (root / "bare.ckpt").write_bytes(b"not really a checkpoint")
    (root / "not-a-model").mkdir()
    (root / ".hidden").mkdir()
    return root


def test_make_tiny_folder_has_marker_and_pipeline(models_dir: Path) -> None:
    folder = models_dir / "v1-5-pruned-emaonly"
    assert json.loads((folder / MARKER).read_text()) == {
        "tiny": True,
        "note": "random weights: output is noise from a tiny test model",
    }
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    assert not (models_dir / "v1-5-pruned-emaonly.safetensors").exists()


def test_catalog_lists_folders_and_single_files(models_dir: Path) -> None:
    infos = {m.name: m for m in ModelCatalog(models_dir).list()}
    assert set(infos) == {"v1-5-pruned-emaonly", "tiny-sf.safetensors", "sf-bare.safetensors", "bare.ckpt"}
    assert infos["v1-5-pruned-emaonly"].kind == "diffusers"
    assert infos["v1-5-pruned-emaonly"].tiny
    sf = infos["tiny-sf.safetensors"]
    assert (sf.kind, sf.tiny, sf.config) == ("single-file", True, models_dir / "tiny-sf.config")
    assert sf.tiny_note() == "random weights: output is noise from a tiny test model"
    bare = infos["sf-bare.safetensors"]  # listed as not tiny before, and its images unmarked
    assert (bare.kind, bare.tiny, bare.config) == ("single-file", True, None)
    assert bare.tiny_note() == "random weights: output is noise from a tiny test model"
    assert (infos["bare.ckpt"].tiny, infos["bare.ckpt"].config) == (False, None)
    assert infos["bare.ckpt"].tiny_note() is None


def test_catalog_of_missing_dir_is_empty(tmp_path: Path) -> None:
    assert ModelCatalog(tmp_path / "nope").list() == []


@pytest.mark.parametrize(
    ("asked", "found"),
    [
        ("v1-5-pruned-emaonly", "v1-5-pruned-emaonly"),
        ("v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly"),
        ("v1-5-pruned-emaonly.safetensors [6ce0161689]", "v1-5-pruned-emaonly"),
        ("tiny-sf.safetensors", "tiny-sf.safetensors"),
        ("tiny-sf", "tiny-sf.safetensors"),
        ("tiny-sf.ckpt", "tiny-sf.safetensors"),
        ("bare.ckpt", "bare.ckpt"),
    ],
)
def test_resolve_by_name_or_stem(models_dir: Path, asked: str, found: str) -> None:
    assert ModelCatalog(models_dir).resolve(asked).name == found


def test_resolve_unknown_lists_available(models_dir: Path) -> None:
    with pytest.raises(NotFound) as e:
        ModelCatalog(models_dir).resolve("sdxl-base")
    assert "sdxl-base" in e.value.message
    assert "v1-5-pruned-emaonly" in e.value.message and "tiny-sf.safetensors" in e.value.message


def test_default_model_is_the_configured_one_else_the_first_by_name(models_dir: Path, tmp_path: Path) -> None:
    catalog = ModelCatalog(models_dir)
    assert default_model("anything-v3.safetensors", catalog) == "anything-v3.safetensors"
    # As SD WebUI loads its first checkpoint: bare.ckpt < tiny-sf.safetensors < v1-5-pruned-emaonly
    assert default_model(None, catalog) == "bare.ckpt"
    make_tiny(tmp_path / "one", "only-one")
    assert default_model(None, ModelCatalog(tmp_path / "one")) == "only-one"
    assert default_model(None, ModelCatalog(tmp_path / "missing")) is None
    assert default_model("", None) is None


def test_single_file_uses_original_ldm_layout(models_dir: Path) -> None:
    with safe_open(str(models_dir / "tiny-sf.safetensors"), "pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert q.ndim == 4  # LDM stores VAE attention projections as 1x1 convolutions
    assert not any(k.startswith(("unet.", "down_blocks.", "vae.")) for k in keys)
    assert not any(p.suffix == ".safetensors" for p in (models_dir / "tiny-sf.config").rglob("*"))


def test_single_file_loads_offline_with_identical_weights(tmp_path: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    folder = make_tiny(tmp_path, "same", seed=7)
    single = make_tiny(tmp_path / "sf", "same", seed=7, single_file=True)
    a = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    b = StableDiffusionPipeline.from_single_file(
        str(single), config=str(single.with_suffix(".config")), local_files_only=True
    )
    for component in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, component).state_dict(), getattr(b, component).state_dict()
        assert sa.keys() == sb.keys(), component
        assert all(torch.equal(sa[k], sb[k]) for k in sa), component
    assert a.tokenizer("a red cat").input_ids == b.tokenizer("a red cat").input_ids
