"""BlobStore contract: every backend in ``store_fixtures.BLOB_FACTORIES`` passes these unchanged."""

from __future__ import annotations

import os

import pytest
import store_fixtures

from sdfleet.errors import NotFound, ValidationFailed
from sdfleet.storage.base import BlobStore

blobs = store_fixtures.blobs  # the fixture, parametrised over every backend

BAD_KEYS = ["../x", "/abs", "a//b", "a/../../b", "", "a/./b", "a/", "a\\b", ".."]


async def test_put_get_round_trip(blobs: BlobStore) -> None:
    key = "tenant-a/01hx/01hx-0.png"
    location = await blobs.put(key, b"\x89PNG fake", "image/png")
    assert location == blobs.location(key)
    assert location.endswith(key)
    assert await blobs.get(key) == b"\x89PNG fake"
    assert await blobs.exists(key)


async def test_location_is_stable_before_put(blobs: BlobStore) -> None:
    key = "p/q/r.out"
    before = blobs.location(key)
    assert before.startswith(("file:///", "s3://"))
    assert await blobs.put(key, b"{}", "application/json") == before


async def test_missing_key(blobs: BlobStore) -> None:
    assert not await blobs.exists("nope/missing.png")
    with pytest.raises(NotFound):
        await blobs.get("nope/missing.png")


async def test_prefix_is_not_a_key(blobs: BlobStore) -> None:
    await blobs.put("dir/file.png", b"x", "image/png")
    assert not await blobs.exists("dir")
    with pytest.raises(NotFound):
        await blobs.get("dir")


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_keys_refused(blobs: BlobStore, key: str) -> None:
    with pytest.raises(ValidationFailed):
        await blobs.put(key, b"x", "text/plain")
    with pytest.raises(ValidationFailed):
        await blobs.get(key)
    with pytest.raises(ValidationFailed):
        await blobs.exists(key)
    with pytest.raises(ValidationFailed):
        blobs.location(key)


async def test_binary_data_intact(blobs: BlobStore) -> None:
    data = bytes(range(256)) * 64 + os.urandom(100_000)
    await blobs.put("bin/blob.bin", data, "application/octet-stream")
    assert await blobs.get("bin/blob.bin") == data
    await blobs.put("bin/empty.bin", b"", "application/octet-stream")
    assert await blobs.get("bin/empty.bin") == b""
    assert await blobs.exists("bin/empty.bin")


async def test_overwrite(blobs: BlobStore) -> None:
    await blobs.put("o/x.json", b'{"v": 1, "long": "' + b"a" * 1000 + b'"}', "application/json")
    await blobs.put("o/x.json", b'{"v": 2}', "application/json")
    assert await blobs.get("o/x.json") == b'{"v": 2}'


async def test_presign_is_a_url_or_none(blobs: BlobStore) -> None:
    await blobs.put("s/img.png", b"x", "image/png")
    url = await blobs.presign("s/img.png", 60)
    assert url is None or url.startswith(("http://", "https://"))


async def test_delete_removes_exactly_the_keys_given(blobs: BlobStore) -> None:
    keys = [f"t/01del/01del-{i}.png" for i in range(3)]
    for k in [*keys, "t/01keep/01keep-0.png"]:
        await blobs.put(k, b"x", "image/png")
    await blobs.delete([keys[0], keys[2], "t/01del/never-stored.png"])  # nothing there: no error
    assert [await blobs.exists(k) for k in keys] == [False, True, False]
    await blobs.delete(keys)  # again, and the rest
    assert not any([await blobs.exists(k) for k in keys])
    assert await blobs.get("t/01keep/01keep-0.png") == b"x", "another task's file stays"
    await blobs.delete([])
    with pytest.raises(ValidationFailed):
        await blobs.delete(["t/01keep/01keep-0.png", "../escape"])
    assert await blobs.exists("t/01keep/01keep-0.png"), "a bad key: nothing deleted"
    await blobs.put(keys[0], b"again", "image/png")  # its folder may be gone: a put makes it again
    assert await blobs.get(keys[0]) == b"again"


async def test_files_lists_a_folders_own_files_only(blobs: BlobStore) -> None:
    for k in ("t/01f/01f-a-1.png", "t/01f/01f-a.out", "t/01f/01g/01g-b-1.png", "t/01fx/01fx-c-1.png"):
        await blobs.put(k, b"x", "image/png")
    assert await blobs.files("t/01f") == ["t/01f/01f-a-1.png", "t/01f/01f-a.out"], "not a subfolder's"
    assert await blobs.files("t/01f/01g") == ["t/01f/01g/01g-b-1.png"]
    assert await blobs.files("t/none") == []
    with pytest.raises(ValidationFailed):
        await blobs.files("../t")
