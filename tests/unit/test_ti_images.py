"""Textual inversion embeddings stored in images, as SD WebUI 1.10 reads them. They were not read:
a prompt naming one read its name as words, without a word said. The images here were made with
SD WebUI 1.10.1's own code (``tests/data/ti-images/make.py``), each beside the vectors it holds."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file
from test_diffusers_embeddings import pipe_of, same

from fakes.servers import a1111_server, free_port
from sdfleet.models import make_tiny
from sdfleet.runtimes import _diffusers_prompts as E
from sdfleet.runtimes import _textual_inversion as T
from sdfleet.runtimes import _ti_images as TI

DATA = Path(__file__).resolve().parents[1] / "data" / "ti-images"
READ = {  # file: the name inside it, its vectors, its step
    "both.png": ("ti-both", 2, 101),
    "chunk.png": ("ti-chunk", 3, 102),
    "pixels.png": ("ti-pixels", 1, 103),
    "drawn.webp": ("ti-webp", 2, 104),
}


def expected(name: str) -> torch.Tensor:
    return load_file(str(DATA / f"{name}.expected.safetensors"))["emb_params"]


@pytest.mark.parametrize("file", sorted(READ))
def test_each_way_sd_webui_stores_one_reads_with_its_name_and_vectors(file: str) -> None:
    """A PNG text chunk, the data drawn into the image's sides (PNG and lossless WebP), or both."""
    name, count, step = READ[file]
    embedding = T.read(DATA / file)
    assert embedding is not None
    assert (embedding.name, embedding.count, embedding.widths, embedding.step) == (name, count, [32], step)
    assert (embedding.sd_checkpoint, embedding.sd_checkpoint_name) == ("a1b2c3d4", "made-for-it")
    assert torch.equal(embedding.vectors[0], expected(name))
    assert embedding.vectors[0].dtype == torch.float32


def test_the_drawn_data_alone_of_an_image_that_has_both(tmp_path: Path) -> None:
    """SD WebUI reads the chunk first; without it (a copy whose chunks were dropped) the strips."""
    with Image.open(DATA / "both.png") as image:
        image.save(tmp_path / "copy.png")  # Pillow writes no text chunk it was not given
    embedding = T.read(tmp_path / "copy.png")
    assert embedding is not None and embedding.name == "ti-both"
    assert torch.equal(embedding.vectors[0], expected("ti-both"))


def test_the_folder_skips_previews_and_plain_pictures(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    shutil.copytree(DATA, folder, ignore=shutil.ignore_patterns("*.py", "*.expected.safetensors", "*-sd15*"))
    names = sorted(e.name for e in T.Embeddings(tmp_path).all())
    # pixels.preview.png holds "ti-preview" but is a preview by its name; plain.png holds nothing
    assert names == ["ti-both", "ti-chunk", "ti-pixels", "ti-webp"]
    assert TI.is_preview(folder / "pixels.preview.png") and not TI.is_preview(folder / "pixels.png")


@pytest.mark.parametrize("file", ["pixels.png", "chunk.png"])
def test_a_prompt_reads_it_as_the_same_vectors_in_a_safetensors_file(tmp_path: Path, file: str) -> None:
    models = tmp_path / "models"
    make_tiny(models, "tiny-a", seed=0)
    pipe = pipe_of(models, "tiny-a")
    name = READ[file][0]
    image, plain = tmp_path / "image", tmp_path / "plain"
    (image / "embeddings").mkdir(parents=True)
    (plain / "embeddings").mkdir(parents=True)
    shutil.copy(DATA / file, image / "embeddings" / file)
    shutil.copy(DATA / f"{name}.expected.safetensors", plain / "embeddings" / f"{name}.safetensors")
    prompt = f"a {name} x"
    with torch.inference_mode():
        from_image = E.encode(pipe, prompt, None, None, E.Reading(embeddings=T.Embeddings(image)))
        from_file = E.encode(pipe, prompt, None, None, E.Reading(embeddings=T.Embeddings(plain)))
        words = E.encode(pipe, prompt, None, None)
    assert same(from_image, from_file) and not same(from_image, words)


def _drawn_png(tmp_path: Path, payload: bytes) -> Path:
    """An image with ``payload`` drawn into its sides as SD WebUI draws it (the strips masked by
    the same sequence), between them a picture, one black column each side."""
    nibbles = np.frombuffer(payload, np.uint8)
    height = 8
    size = -(-nibbles.size // (height * 3)) * height * 3
    low, high = (np.resize(part, size).reshape(height, -1, 3) for part in (nibbles & 0x0F, nibbles >> 4))
    low, high = TI._unmasked(low), TI._unmasked(high)  # xor is its own inverse
    picture = np.full((height, 4, 3), 200, np.uint8)
    black = np.zeros((height, 1, 3), np.uint8)
    pixels = np.concatenate([low | 0xF0, black, picture, black, high | 0xF0], axis=1)
    path = tmp_path / "drawn.png"
    Image.fromarray(pixels).save(path)
    return path


def test_drawn_data_as_sd_webui_draws_it_reads(tmp_path: Path) -> None:
    """The reader's own inverse: data drawn here reads back (the strips' high bits are picture)."""
    data = {"string_to_param": {"*": {"TORCHTENSOR": [[0.5, -1.0]]}}, "name": "drawn-here", "step": 7}
    path = _drawn_png(tmp_path, zlib.compress(json.dumps(data).encode()))
    embedding = T.read(path)
    assert embedding is not None and embedding.name == "drawn-here" and embedding.step == 7
    assert embedding.vectors[0].tolist() == [[0.5, -1.0]]


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (zlib.compress(b"\0" * (TI.DATA_MAX + 1)), "unpacks to more than"),
        (zlib.compress(b'{"string_to_param": {"*": {"TORCHTENSOR": [["a"]]}}}'), "holds no numbers"),
        (zlib.compress(b"[1, 2]"), "not an object"),
        (b"not zlib data at all", "Error -3"),
    ],
)
def test_bad_drawn_data_skips_the_file_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, payload: bytes, why: str
) -> None:
    path = _drawn_png(tmp_path, payload)
    with caplog.at_level(logging.WARNING, logger="sdfleet.runtimes._textual_inversion"):
        assert T.read(path) is None
    assert "drawn.png not read" in caplog.text and why in caplog.text, caplog.text


def test_a_bad_text_chunk_skips_the_file_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text(TI.CHUNK, base64.b64encode(b"{not json").decode())
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "bad.png", pnginfo=info)
    with caplog.at_level(logging.WARNING, logger="sdfleet.runtimes._textual_inversion"):
        assert T.read(tmp_path / "bad.png") is None
    assert "bad.png not read" in caplog.text


def test_runtime_serve_lists_them_by_their_names_inside(tmp_path: Path) -> None:
    """As SD WebUI 1.10.1 listed the same files (``-sd15`` ones, the interop suite)."""
    import webuiapi

    folder = tmp_path / "embeddings"
    folder.mkdir()
    for file in (*READ, "plain.png", "pixels.preview.png"):
        shutil.copy(DATA / file, folder / file)
    server = a1111_server(tmp_path, free_port())
    try:
        lists = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1").get_embeddings()
    finally:
        server.stop()
    trained = {"sd_checkpoint": "a1b2c3d4", "sd_checkpoint_name": "made-for-it", "shape": 32}
    assert lists == {
        "loaded": {name: {"step": step, **trained, "vectors": n} for name, n, step in READ.values()},
        "skipped": {},
    }


def test_a_picture_is_not_an_embedding() -> None:
    assert TI.read(DATA / "plain.png") is None
    with Image.open(io.BytesIO((DATA / "plain.png").read_bytes())) as image:
        assert TI.CHUNK not in getattr(image, "text", {})
