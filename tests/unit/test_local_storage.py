"""LocalBlobStore specifics: URLs, on-disk layout, atomic writes, OS errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sdfleet.errors import ConfigError, NotFound, StorageError
from sdfleet.storage import open_storage
from sdfleet.storage.backends.local import LocalBlobStore, file_path


def test_file_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert file_path("file:///abs/files") == Path("/abs/files")
    assert file_path("file://localhost/abs/files") == Path("/abs/files")
    assert file_path("file:///abs/my%20files") == Path("/abs/my files")
    assert file_path("file://./rel/files") == Path("./rel/files")
    for bad in ("file://", "file://host/x", "s3://b/k"):
        with pytest.raises(ConfigError):
            file_path(bad)
    monkeypatch.chdir(tmp_path)
    assert LocalBlobStore.from_url("file://./data/files").root == tmp_path / "data" / "files"


async def test_layout_and_location(tmp_path: Path) -> None:
    blobs = open_storage(f"file://{tmp_path}/files")
    assert isinstance(blobs, LocalBlobStore)
    location = await blobs.put("t/01hx/01hx-0.png", b"png", "image/png")
    target = tmp_path / "files" / "t" / "01hx" / "01hx-0.png"
    assert location == f"file://{target}"
    assert target.read_bytes() == b"png"
    assert await blobs.presign("t/01hx/01hx-0.png", 60) is None
    await blobs.aclose()


async def test_concurrent_writers_leave_whole_files_and_no_temp_files(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    await asyncio.gather(*(blobs.put("k/v.bin", p, "application/octet-stream") for p in payloads))
    assert await blobs.get("k/v.bin") in payloads
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["v.bin"]


async def test_os_errors_become_storage_errors(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    await blobs.put("f", b"a file", "text/plain")
    with pytest.raises(StorageError) as info:
        await blobs.put("f/g", b"under a file", "text/plain")
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(NotFound):
        await blobs.get("f/g")
    (tmp_path / "d").mkdir()
    with pytest.raises(StorageError) as info2:
        await blobs.put("d", b"onto a directory", "text/plain")
    assert not isinstance(info2.value, NotFound)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]  # no temp file left behind
