"""Textual inversion embeddings stored in images, next to a real SD WebUI (``SDFLEET_A1111_URL``,
see ``test_a1111_interop.py``): the same files in its embeddings folder and read by sdfleet, the
same names, vectors, shapes and training words; the same ``TI hashes`` in an image's infotext;
and SD WebUI's own test image (``modules/textual_inversion/test_embedding.png``, made by its
training) read as SD WebUI reads it."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from real_servers import A1111_URL, needs_a1111
from sdfleet.runtimes import _textual_inversion as T

pytestmark = [needs_a1111, pytest.mark.timeout(600)]

DATA = Path(__file__).resolve().parents[1] / "data" / "ti-images"
FILES = ["both-sd15.png", "chunk-sd15.png", "pixels-sd15.png", "drawn-sd15.webp", "plain-sd15.png"]
PREVIEW = "pixels-sd15.preview.png"


def embeddings_folder() -> Path:
    flags = httpx.get(f"{A1111_URL}/sdapi/v1/cmd-flags", timeout=60).json()
    folder = Path(flags["embeddings_dir"])
    # the suite runs beside its server (docs/runtimes.md): its folder must be here
    assert folder.is_dir(), f"SD WebUI's embeddings folder {folder} is not on this machine"
    return folder


@pytest.fixture(scope="module")
def theirs() -> Iterator[Path]:
    """This folder's SD 1.5-wide image embeddings (and a picture, and a preview) in a sub-folder
    of SD WebUI's embeddings folder while the module runs."""
    folder = embeddings_folder() / "sdfleet-ti-images"
    folder.mkdir()
    for file in (*FILES, PREVIEW):
        shutil.copy(DATA / file, folder / file)
    try:
        httpx.post(f"{A1111_URL}/sdapi/v1/refresh-embeddings", timeout=60).raise_for_status()
        yield folder
    finally:
        shutil.rmtree(folder)
        httpx.post(f"{A1111_URL}/sdapi/v1/refresh-embeddings", timeout=60)


def read_by_sdfleet(folder: Path) -> list[T.Embedding]:
    """What the diffusers runtime finds in ``folder`` as its models folder's embeddings folder."""
    embeddings = T.Embeddings(folder)
    embeddings.folder = folder
    return embeddings.all()


def listed(embedding: T.Embedding) -> dict[str, object]:
    """What SD WebUI's ``/embeddings`` says of one."""
    return {
        "step": embedding.step,
        "sd_checkpoint": embedding.sd_checkpoint,
        "sd_checkpoint_name": embedding.sd_checkpoint_name,
        "shape": embedding.shape,
        "vectors": embedding.count,
    }


def test_sd_webui_lists_what_sdfleet_reads_from_the_same_files(theirs: Path) -> None:
    answer = httpx.get(f"{A1111_URL}/sdapi/v1/embeddings", timeout=60).json()
    ours = {e.name: listed(e) for e in read_by_sdfleet(theirs) if e.name.startswith("ti-")}
    loaded = {name: v for name, v in answer["loaded"].items() if name.startswith("ti-")}
    assert sorted(loaded) == ["ti-both-sd15", "ti-chunk-sd15", "ti-pixels-sd15", "ti-webp-sd15"]
    assert ours == loaded


def test_the_ti_hashes_of_an_image_embedding_are_sd_webuis(theirs: Path) -> None:
    body = {"prompt": "a ti-pixels-sd15 cat", "negative_prompt": "ti-webp-sd15", "steps": 1}
    body |= {"width": 64, "height": 64, "seed": 5, "sampler_name": "Euler"}
    # SD WebUI reuses the last job's encoding of the same prompts and then writes no TI hashes
    # (docs/runtimes.md): another job's first, so that a second run of the suite encodes again
    other = httpx.post(
        f"{A1111_URL}/sdapi/v1/txt2img", json=body | {"prompt": "x", "negative_prompt": ""}, timeout=600
    )
    assert other.status_code == 200, other.text
    answer = httpx.post(f"{A1111_URL}/sdapi/v1/txt2img", json=body, timeout=600)
    assert answer.status_code == 200, answer.text
    said = json.loads(answer.json()["info"])["infotexts"][0]
    short = {f: hashlib.sha256((theirs / f).read_bytes()).hexdigest()[:12] for f in FILES}
    ours = {e.name: e.hash for e in read_by_sdfleet(theirs) if e.hash}
    assert ours["ti-pixels-sd15"][:12] == short["pixels-sd15.png"]
    # the negative prompt's call first, then the prompt's, each call's in front (docs/runtimes.md)
    hashes = (
        f'TI hashes: "ti-pixels-sd15: {short["pixels-sd15.png"]}, ti-webp-sd15: {short["drawn-sd15.webp"]}"'
    )
    assert hashes in said, said


def test_sd_webuis_own_test_embedding_reads_as_it_reads_it(theirs: Path) -> None:
    """Made by SD WebUI's training: its data in a text chunk and drawn into the picture."""
    own = theirs.parent.parent / "modules" / "textual_inversion" / "test_embedding.png"
    assert own.is_file(), f"SD WebUI's source is not beside its embeddings folder here: {own}"
    copy = theirs / "sdfleet-rick.png"
    shutil.copy(own, copy)
    try:
        httpx.post(f"{A1111_URL}/sdapi/v1/refresh-embeddings", timeout=60).raise_for_status()
        answer = httpx.get(f"{A1111_URL}/sdapi/v1/embeddings", timeout=60).json()
        embedding = T.read(copy)
    finally:
        copy.unlink()
    assert embedding is not None and embedding.name == "rick"
    assert (
        answer["loaded"]["rick"]
        == listed(embedding)
        == {
            "step": 60,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
            "shape": 768,
            "vectors": 8,
        }
    )
