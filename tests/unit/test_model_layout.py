"""Which files make a model (the same rules for a folder and an S3 prefix), transfer order, part
sizes, thumbnails and the LRU bookkeeping of ``ModelFetcher.use``."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from sdfleet.api.thumbs import make_thumbnail, thumb_key
from sdfleet.models.catalog import match_name
from sdfleet.models.fetcher import ModelFetcher
from sdfleet.models.layout import ChecksumCache, group, local_models, sha256_file, top_entries, visible_last
from sdfleet.models.locks import lock_path, unless_used
from sdfleet.models.transfer import MIB, part_size_for


def test_group_finds_folders_single_files_and_their_sidecars() -> None:
    paths = [
        "sd15/model_index.json",
        "sd15/unet/diffusion_pytorch_model.safetensors",
        "x.safetensors",
        "x.config/model_index.json",
        "x.config/unet/config.json",
        "orphan.config/model_index.json",  # a sidecar without its checkpoint is nothing
        "notes/readme.txt",  # a folder without model_index.json is nothing
        ".sdfleet/partial/y.safetensors",
        "loose.txt",
        "y.ckpt",
    ]
    assert group(paths) == {
        "sd15": ["sd15/model_index.json", "sd15/unet/diffusion_pytorch_model.safetensors"],
        "x.safetensors": ["x.config/model_index.json", "x.config/unet/config.json", "x.safetensors"],
        "y.ckpt": ["y.ckpt"],
    }


def test_the_file_that_makes_a_model_visible_moves_last() -> None:
    assert visible_last("sd15", ["sd15/model_index.json", "sd15/vae/a", "sd15/unet/b"]) == [
        "sd15/unet/b",
        "sd15/vae/a",
        "sd15/model_index.json",
    ]
    assert (
        visible_last("x.safetensors", ["x.safetensors", "x.config/model_index.json"])[-1] == "x.safetensors"
    )
    assert top_entries("x.safetensors") == ["x.config", "x.safetensors"]
    assert top_entries("sd15") == ["sd15"]


def test_local_models_and_checksum_cache(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"a" * 10)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "model_index.json").write_text("{}")
    (tmp_path / "f" / ".hidden").mkdir()
    (tmp_path / "f" / ".hidden" / "x").write_text("ignored")
    found = local_models(tmp_path)
    assert {n: (m.kind, m.files) for n, m in found.items()} == {
        "a.safetensors": ("single-file", {"a.safetensors": 10}),
        "f": ("diffusers", {"f/model_index.json": 2}),
    }
    cache = ChecksumCache(tmp_path)
    digest = cache.sha256("a.safetensors")
    assert digest == sha256_file(tmp_path / "a.safetensors")
    assert ChecksumCache(tmp_path).sha256("a.safetensors") == digest  # read back from the file
    (tmp_path / "a.safetensors").write_bytes(b"b" * 11)  # changed: hashed again
    assert ChecksumCache(tmp_path).sha256("a.safetensors") == sha256_file(tmp_path / "a.safetensors")
    assert not (tmp_path / "elsewhere" / ".sdfleet").exists()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "m.ckpt").write_bytes(b"m")
    ChecksumCache(tmp_path / "elsewhere", persist=False).sha256("m.ckpt")
    assert not (tmp_path / "elsewhere" / ".sdfleet").exists()  # a user's folder stays as it was


def test_part_size_grows_past_ten_thousand_parts() -> None:
    assert part_size_for(100 * MIB, 16 * MIB) == 16 * MIB
    assert part_size_for(200_000 * MIB, 16 * MIB) == 20 * MIB


def test_names_match_as_the_catalog_matches_them() -> None:
    names = ["v1-5-pruned-emaonly", "sd_xl.safetensors"]
    assert match_name("v1-5-pruned-emaonly.safetensors [6ce0161689]", names) == "v1-5-pruned-emaonly"
    assert match_name("sd_xl", names) == "sd_xl.safetensors"
    assert match_name("other", names) is None


def test_use_holds_the_last_models_and_marks_them_recent(tmp_path: Path) -> None:
    fetcher = ModelFetcher(tmp_path, "s3://unused/models", keep=2)
    try:
        for name in ("a", "b", "c"):
            fetcher.use(name)
        with unless_used(lock_path(tmp_path, "a", "use")) as free:
            assert free  # fell out of the last two
        with unless_used(lock_path(tmp_path, "c", "use")) as free:
            assert not free
        times = {n: os.stat(lock_path(tmp_path, n, "use")).st_mtime_ns for n in "abc"}
        assert times["a"] <= times["b"] <= times["c"]
    finally:
        fetcher.release_all()
    with unless_used(lock_path(tmp_path, "c", "use")) as free:
        assert free


def test_thumbnails_are_small_jpegs_stored_beside_the_image() -> None:
    assert thumb_key("t/id/id/id-1.png") == "t/id/id/id-1.thumb.jpg"
    big = io.BytesIO()
    Image.new("RGB", (1024, 512), (200, 30, 30)).save(big, format="PNG")
    with Image.open(io.BytesIO(make_thumbnail(big.getvalue()))) as thumb:
        assert (thumb.format, thumb.size) == ("JPEG", (256, 128))
    small = io.BytesIO()
    Image.new("RGBA", (64, 64)).save(small, format="PNG")
    with Image.open(io.BytesIO(make_thumbnail(small.getvalue()))) as thumb:
        assert thumb.size == (64, 64)  # never enlarged
