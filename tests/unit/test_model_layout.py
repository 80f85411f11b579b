"""Which files make a model (the same rules for a folder and an S3 prefix), transfer order, part
sizes, thumbnails and the LRU bookkeeping of ``ModelFetcher.use``."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from sdfleet.api.thumbs import make_thumbnail, thumb_key
from sdfleet.models import ModelCatalog, checkpoint_hash, layout
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


def test_checksums_are_shared_between_processes_and_survive_a_read_only_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent reads the checksums a ``models pull`` beside it recorded after it started (a miss
    reads the file again), and a write merges with what another process wrote meanwhile."""
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / name).write_bytes(name.encode())
    agent, pull = ChecksumCache(tmp_path), ChecksumCache(tmp_path)
    assert agent.known("a.safetensors") is None
    pull.remember("a.safetensors", "f" * 64)  # checked on download, as the pull records it
    assert agent.known("a.safetensors") == agent.sha256("a.safetensors") == "f" * 64  # not read
    agent.remember("b.safetensors", "e" * 64)
    assert ChecksumCache(tmp_path).known("a.safetensors") == "f" * 64  # the agent's write kept it
    # a folder that cannot hold .sdfleet/: remembered in memory, said once, never an error
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / ".sdfleet").write_text("a file where the folder would be")
    (locked / "m.ckpt").write_bytes(b"m")
    cache = ChecksumCache(locked)
    with caplog.at_level(logging.WARNING, logger="sdfleet.models.layout"):
        assert cache.sha256("m.ckpt") == sha256_file(locked / "m.ckpt") == cache.known("m.ckpt")
    assert "kept in memory only" in caplog.text and not cache.persist


def test_a_checkpoints_hash_is_sd_webuis_and_a_pulled_one_is_not_read_again(tmp_path: Path) -> None:
    (tmp_path / "m.safetensors").write_bytes(b"weights")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "model_index.json").write_text("{}")
    catalog = ModelCatalog(tmp_path)
    single, folder = catalog.resolve("m.safetensors"), catalog.resolve("f")
    assert checkpoint_hash.known(single) is None and checkpoint_hash.known(folder) is None
    assert checkpoint_hash.sha256(single) == hashlib.sha256(b"weights").hexdigest()  # SD WebUI's
    assert checkpoint_hash.known(single) == hashlib.sha256(b"weights").hexdigest()
    assert checkpoint_hash.sha256(folder) == checkpoint_hash.known(folder)
    (tmp_path / "p.safetensors").write_bytes(b"pulled")
    ChecksumCache(tmp_path).remember("p.safetensors", "c" * 64)  # what `models pull` verified
    assert checkpoint_hash.sha256(catalog.resolve("p")) == "c" * 64


def test_two_callers_read_a_checkpoint_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs of a model loaded just now (the second waits at the device) both want its hash:
    the second waits for the first one's reading instead of reading gigabytes beside it."""
    (tmp_path / "m.safetensors").write_bytes(b"w" * 1000)
    reads: list[Path] = []

    def slow_read(path: Path, chunk: int = 4 * 2**20) -> str:
        reads.append(path)
        time.sleep(0.2)  # long enough for the other caller to arrive while this one reads
        return sha256_file(path, chunk)

    monkeypatch.setattr(layout, "sha256_file", slow_read)
    info = ModelCatalog(tmp_path).resolve("m")
    with ThreadPoolExecutor(2) as pool:
        digests = list(pool.map(lambda _: checkpoint_hash.sha256(info), range(2)))
    assert digests == [hashlib.sha256(b"w" * 1000).hexdigest()] * 2 and len(reads) == 1


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
