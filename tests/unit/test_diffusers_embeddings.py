"""SD WebUI's textual inversion embeddings (``<models>/embeddings/``) in the diffusers runtime, on
tiny random-weight SD 1.x and SDXL models (CPU, 64x64). A prompt naming one was read as words.

The check that holds them to SD WebUI's reading without SD WebUI: an embedding whose vectors are
the text encoder's own token embeddings of "red dog" must read exactly as the words "red dog"
(its vectors take the name's places, before the position embeddings, as SD WebUI's
``EmbeddingsWithFixes`` puts them).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webuiapi
from safetensors.torch import save_file
from test_diffusers_batching import pixels, quiet

from fakes.servers import a1111_server, free_port
from sdfleet.infotext import VERSION
from sdfleet.models import ModelCatalog, make_tiny
from sdfleet.runtimes import _diffusers_prompts as E
from sdfleet.runtimes import _prompt_schedule as PS
from sdfleet.runtimes import _prompt_syntax as S
from sdfleet.runtimes._diffusers_pipes import load_pipeline
from sdfleet.runtimes._textual_inversion import Embeddings
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType

NAME = "zqxembed"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny(root, "tiny-a", seed=0)
    make_tiny(root, "tiny-xl", seed=0, sdxl=True)
    return root


def pipe_of(models: Path, name: str) -> Any:
    return load_pipeline(ModelCatalog(models).resolve(name), "cpu", torch.float32)


def rows_of(tokenizer: Any, encoder: Any, text: str) -> torch.Tensor:
    """The encoder's own token embeddings of ``text``'s tokens."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return encoder.get_input_embeddings().weight[ids].detach().clone()


def same(a: E.Embeds, b: E.Embeds) -> bool:
    pairs = [(a.prompt, b.prompt), (a.negative, b.negative), (a.pooled, b.pooled)]
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in pairs
    )


def test_an_a1111_embedding_reads_as_the_words_its_vectors_are(models: Path, tmp_path: Path) -> None:
    pipe = pipe_of(models, "tiny-a")
    folder = tmp_path / "embeddings" / "sub"  # sub-folders too
    folder.mkdir(parents=True)
    torch.save(
        {"string_to_param": {"*": rows_of(pipe.tokenizer, pipe.text_encoder, "red dog")}},
        folder / f"{NAME}.pt",
    )
    reading = E.Reading(embeddings=Embeddings(tmp_path))
    with torch.inference_mode():
        named = E.encode(pipe, f"a {NAME}, in a field", "blurry", None, reading)
        words = E.encode(pipe, "a red dog, in a field", "blurry", None)
        shouted = E.encode(pipe, f"a {NAME.upper()}, in a field", "blurry", None, reading)
        without = E.encode(pipe, f"a {NAME}, in a field", "blurry", None)
    assert same(named, words) and same(shouted, words)  # found among the tokens: any case
    assert not same(without, words)  # no embeddings folder: the name is words
    assert E.chunk_count(pipe, f"a {NAME}", "", reading) == (1, False)  # not handed over as text
    assert E.chunk_count(pipe, "a cat", "", reading) == (1, True)  # the rest still is


def test_an_sdxl_embedding_has_vectors_for_each_encoder(models: Path, tmp_path: Path) -> None:
    pipe = pipe_of(models, "tiny-xl")
    (tmp_path / "embeddings").mkdir()
    vectors = {
        "clip_l": rows_of(pipe.tokenizer, pipe.text_encoder, "red dog"),
        "clip_g": rows_of(pipe.tokenizer_2, pipe.text_encoder_2, "red dog"),
    }
    save_file(vectors, str(tmp_path / "embeddings" / f"{NAME}.safetensors"))
    reading = E.Reading(embeddings=Embeddings(tmp_path))
    with torch.inference_mode():
        named = E.encode(pipe, f"a {NAME}", None, None, reading)
        words = E.encode(pipe, "a red dog", None, None)
    assert same(named, words)  # the pooled output too
    sd15 = pipe_of(models, "tiny-a")  # an SDXL embedding is not for SD 1.x: its name stays words
    with torch.inference_mode():
        assert same(E.encode(sd15, f"a {NAME}", None, None, reading), E.encode(sd15, f"a {NAME}", None, None))


@pytest.mark.parametrize("form", ["concept.bin", "emb_params.safetensors"])
def test_the_other_formats_sd_webui_reads(models: Path, tmp_path: Path, form: str) -> None:
    pipe = pipe_of(models, "tiny-a")
    (tmp_path / "embeddings").mkdir()
    vectors = rows_of(pipe.tokenizer, pipe.text_encoder, "r")  # one vector
    if form == "concept.bin":  # a diffusers concept: one 1-D tensor under its token
        torch.save({"<zqx>": vectors[0]}, tmp_path / "embeddings" / f"{NAME}.bin")
    else:
        save_file({"emb_params": vectors}, str(tmp_path / "embeddings" / f"{NAME}.safetensors"))
    with torch.inference_mode():
        named = E.encode(pipe, f"a {NAME} x", None, None, E.Reading(embeddings=Embeddings(tmp_path)))
        words = E.encode(pipe, "a r x", None, None)
    assert same(named, words)


def test_an_embedding_is_not_split_between_chunks_and_moves_with_its_comma() -> None:
    def tokenize(text: str) -> list[int]:
        return [ord(c) for c in text]

    def find(tokens: list[int], position: int) -> tuple[Any, int, int] | None:
        return ("E", 3, 1) if tokens[position] == ord("E") else None  # "E": three vectors

    pieces = S.weighted("a" * 73 + "E")
    chunks = S.chunk(pieces, tokenize, None, find)
    assert [len(c.ids) for c in chunks] == [73, 3] and chunks[1].slots == [(0, "E")]
    comma = S.chunk(S.weighted("a" * 60 + "," + "b" * 5 + "E" + "c" * 7), tokenize, ord(","), find)
    assert [len(c.ids) for c in comma] == [61, 15]  # cut after the comma: the embedding moved along
    assert comma[1].slots == [(5, "E")] and comma[0].slots == []


@pytest.fixture(scope="module")
def runtime(models: Path) -> DiffusersRuntime:
    return DiffusersRuntime.from_options(catalog=ModelCatalog(models), options={"device": "cpu"})


def job(prompt: str) -> Job:
    params = TaskParams(prompt=prompt, steps=2, width=64, height=64, seed=3, sampler="Euler")
    return Job("t-1", TaskType.TEXT_TO_IMAGE, "tiny-a", params)


async def test_the_runtime_reads_the_models_folders_embeddings(
    runtime: DiffusersRuntime, models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = models / "embeddings"
    folder.mkdir(exist_ok=True)
    pipe = pipe_of(models, "tiny-a")
    path = folder / f"{NAME}.pt"
    torch.save({"string_to_param": {"*": rows_of(pipe.tokenizer, pipe.text_encoder, "red dog")}}, path)
    (folder / "broken.pt").write_bytes(b"not a tensor file")
    with caplog.at_level(logging.WARNING, logger="sdfleet.runtimes._textual_inversion"):
        named = await runtime.run(job(f"a {NAME}"), quiet)
    assert "textual inversion embedding" in caplog.text and "broken.pt" in caplog.text  # skipped
    words = await runtime.run(job("a red dog"), quiet)
    assert np.array_equal(pixels(named.images[0]), pixels(words.images[0]))
    weighted = await runtime.run(job(f"a ({NAME}:1.4)"), quiet)
    assert not np.array_equal(pixels(weighted.images[0]), pixels(words.images[0]))
    # a file changed in place is read again
    torch.save({"string_to_param": {"*": rows_of(pipe.tokenizer, pipe.text_encoder, "a cat")}}, path)
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 5))
    again = await runtime.run(job(f"a {NAME}"), quiet)
    cat = await runtime.run(job("a a cat"), quiet)
    assert np.array_equal(pixels(again.images[0]), pixels(cat.images[0]))


def test_runtime_serve_lists_them_as_sd_webui_does(models: Path, tmp_path: Path) -> None:
    """``GET /sdapi/v1/embeddings`` (webuiapi's ``get_embeddings``) was not served: the loaded
    model's embeddings, and the others as skipped, with what an A1111 file says of its training."""
    sd, xl = pipe_of(models, "tiny-a"), pipe_of(models, "tiny-xl")
    folder = tmp_path / "embeddings"
    folder.mkdir()
    mine = rows_of(sd.tokenizer, sd.text_encoder, "red dog")
    trained = {"step": 500, "sd_checkpoint": "c34d81fac4", "sd_checkpoint_name": "sd15"}
    torch.save({"string_to_param": {"*": mine}, **trained}, folder / "mine.pt")
    other = {
        "clip_l": rows_of(xl.tokenizer, xl.text_encoder, "a"),
        "clip_g": rows_of(xl.tokenizer_2, xl.text_encoder_2, "a"),
    }
    save_file(other, str(folder / "xl-one.safetensors"))
    server = a1111_server(tmp_path, free_port())  # tiny-a loaded, as SD WebUI starts
    try:
        lists = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1").get_embeddings()
    finally:
        server.stop()
    width = sd.text_encoder.get_input_embeddings().embedding_dim
    xl_shape = sum(int(v.shape[-1]) for v in other.values())
    assert lists == {
        "loaded": {"mine": {**trained, "shape": width, "vectors": len(mine)}},
        "skipped": {
            "xl-one": {
                "step": None,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                "shape": xl_shape,
                "vectors": 1,
            }
        },
    }


def short(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@pytest.fixture
def named_models(models: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A models folder with tiny-a and tiny-xl and four embeddings; their hashes by name."""
    for name in ("tiny-a", "tiny-xl"):
        os.symlink(models / name, tmp_path / name)
    sd, xl = pipe_of(models, "tiny-a"), pipe_of(models, "tiny-xl")
    folder = tmp_path / "embeddings"
    folder.mkdir()
    for name, words in (("pos-e", "red"), ("neg-e", "blue"), ("zq,x", "green")):
        torch.save(
            {"string_to_param": {"*": rows_of(sd.tokenizer, sd.text_encoder, words)}}, folder / f"{name}.pt"
        )
    both = {
        "clip_l": rows_of(xl.tokenizer, xl.text_encoder, "red"),
        "clip_g": rows_of(xl.tokenizer_2, xl.text_encoder_2, "red"),
    }
    save_file(both, str(folder / "xl-e.safetensors"))
    return tmp_path, {p.stem: short(p) for p in folder.iterdir()}


def said(root: Path, model: str, prompt: str, negative: str, emphasis: str = "Original") -> dict[str, str]:
    edits, _ = PS.of_task(prompt, negative, 4)
    return E.conditioning_said(pipe_of(root, model), edits, E.Reading(emphasis, Embeddings(root)))


def test_ti_hashes_are_said_call_by_call_as_sd_webui_says_them(
    named_models: tuple[Path, dict[str, str]],
) -> None:
    """SD WebUI writes ``TI hashes`` per text-encoder call, each call's names in front of the
    ones before, the negative prompt's calls first: an SDXL embedding is named once per encoder.
    ``:`` and ``,`` are taken out of a name. Written nowhere before."""
    root, h = named_models
    assert said(root, "tiny-a", "a pos-e and zq,x cat", "neg-e blurry") == {
        "TI hashes": f"pos-e: {h['pos-e']}, zqx: {h['zq,x']}, neg-e: {h['neg-e']}"
    }
    assert said(root, "tiny-xl", "a xl-e cat", "") == {"TI hashes": f"xl-e: {h['xl-e']}, xl-e: {h['xl-e']}"}
    assert said(root, "tiny-a", "a cat", "blurry") == {}
    # Emphasis comes where the call that first has a bracket says it
    assert list(said(root, "tiny-a", "(a) pos-e", "neg-e", "No norm")) == ["TI hashes", "Emphasis"]
    assert list(said(root, "tiny-a", "pos-e", "(blurry)", "No norm")) == ["Emphasis", "TI hashes"]
    # what the encoders read: an edited prompt's texts, without its brackets
    assert said(root, "tiny-a", "[a cat:pos-e:2]", "", "No norm") == {"TI hashes": f"pos-e: {h['pos-e']}"}


async def test_the_runtime_and_runtime_serve_write_ti_hashes_alike(
    named_models: tuple[Path, dict[str, str]],
) -> None:
    root, h = named_models
    runtime = DiffusersRuntime(ModelCatalog(root), default_model="tiny-a", device="cpu")
    body = {
        "prompt": "a pos-e cat",
        "negative_prompt": "(neg-e)",
        "steps": 2,
        "width": 64,
        "height": 64,
        "seed": 3,
    }
    try:
        params = TaskParams(
            prompt=body["prompt"],
            negative_prompt=body["negative_prompt"],
            steps=2,
            width=64,
            height=64,
            seed=3,
            sampler="Euler",
            extra={"override_settings": {"emphasis": "No norm"}},
        )
        made = await runtime.run(Job("t", TaskType.TEXT_TO_IMAGE, "tiny-a", params), quiet)
    finally:
        await runtime.aclose()
    text = made.info["infotexts"][0]
    assert text.endswith(
        f'TI hashes: "pos-e: {h["pos-e"]}, neg-e: {h["neg-e"]}", Emphasis: No norm, Version: {VERSION}'
    ), text
    server = a1111_server(root, free_port())
    try:
        api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler", steps=2)
        served = api.txt2img(**body, override_settings={"emphasis": "No norm"})
        api.set_options({"textual_inversion_add_hashes_to_infotext": False})
        off = api.txt2img(**body, override_settings={"emphasis": "No norm"})
    finally:
        server.stop()
    assert served.info["infotexts"][0] == text
    assert off.info["infotexts"][0] == text.replace(
        f'TI hashes: "pos-e: {h["pos-e"]}, neg-e: {h["neg-e"]}", ', ""
    )
