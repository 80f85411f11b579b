"""SD WebUI's prompt syntax in the diffusers runtime: emphasis, escapes, BREAK and prompts past 75
tokens, on tiny random-weight SD 1.x and SDXL models (CPU, 64x64, 2 steps).

The parser's expected values are SD WebUI's own documented examples (``parse_prompt_attention``);
the parser and the chunker were also run against SD WebUI 1.10.1's own functions (the issue note
says how), which these tests do not import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_diffusers_batching import assert_same_images, pixels, quiet

from sdfleet.errors import Reject
from sdfleet.infotext import VERSION
from sdfleet.models import ModelCatalog, make_tiny
from sdfleet.runtimes import _diffusers_prompts as E
from sdfleet.runtimes import _prompt_syntax as S
from sdfleet.runtimes._diffusers_checks import check
from sdfleet.runtimes._diffusers_pipes import load_pipeline
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.runtimes.unsupported import refuse
from sdfleet.tasks import TaskParams, TaskType

LONG = "a red cat on a sofa, " * 8  # 112 tokens of the tiny tokenizer: past 75


def pairs(prompt: str) -> list[tuple[str, float]]:
    return [("BREAK", -1.0) if p.brk else (p.text, round(p.weight, 6)) for p in S.weighted(prompt)]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [  # SD WebUI 1.10.1's docstring examples of parse_prompt_attention
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("<lora:x:0.8> (y:1.5)", [("<lora:x:0.8> ", 1.0), ("y", 1.5)]),  # a tag's weight is text
        ("a) b:1.2)", [("a) b:1.2)", 1.0)]),  # closers with nothing open are text
    ],
)
def test_weights_as_sd_webui_reads_them(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert pairs(prompt) == expected


def test_a_weight_that_is_not_a_number_is_refused_at_the_door_of_a_diffusers_queue() -> None:
    params = TaskParams(prompt="a (cat:1.2.3)")
    with pytest.raises(Reject) as raised:
        refuse("diffusers", TaskType.TEXT_TO_IMAGE, params)
    assert raised.value.code == "invalid_params"
    assert raised.value.reason == "prompt weight '1.2.3' is not a number (emphasis is written (words:1.2))"
    refuse("a1111", TaskType.TEXT_TO_IMAGE, params)  # SD WebUI's own to answer
    with pytest.raises(Reject):
        refuse("diffusers", TaskType.IMAGE_TO_IMAGE, TaskParams(prompt="x", negative_prompt="(y:.)"))


def test_chunks_break_at_75_tokens_after_a_comma_and_at_break() -> None:
    def tokenize(text: str) -> list[int]:  # one token a character; ',' is 44
        return [ord(c) for c in text]

    def lengths(prompt: str) -> list[int]:
        return [len(c.ids) for c in S.chunk(S.weighted(prompt), tokenize, ord(","))]

    assert lengths("") == [0]
    assert lengths("x" * 75) == [75]
    assert lengths("x" * 76) == [75, 1]
    assert lengths("x" * 60 + "," + "y" * 30) == [61, 30]  # cut after the comma, 15 back
    assert lengths("x" * 50 + "," + "y" * 30) == [75, 6]  # 25 back: too far, cut at 75
    assert lengths("ab BREAK cd") == [2, 2]
    assert lengths("BREAK cd") == [0, 2]
    chunks = S.chunk(S.weighted("a (b:1.5) c"), tokenize, ord(","))
    assert chunks[0].weights == [1.0, 1.0, 1.5, 1.0, 1.0]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> ModelCatalog:
    root = tmp_path_factory.mktemp("models")
    make_tiny(root, "tiny-a", seed=0)
    make_tiny(root, "tiny-xl", seed=0, sdxl=True)
    return ModelCatalog(root)


@pytest.fixture(scope="module")
def runtime(catalog: ModelCatalog) -> DiffusersRuntime:
    options = {"device": "cpu", "max_batch": 4, "max_batch_wait_ms": 20}
    return DiffusersRuntime.from_options(catalog=catalog, options=options, default_model="tiny-a")


def job(task_id: str, model: str = "tiny-a", **params: object) -> Job:
    base: dict[str, object] = {"prompt": "a red cat", "steps": 2, "width": 64, "height": 64, "seed": 1}
    base.update(params)
    return Job(task_id, TaskType.TEXT_TO_IMAGE, model, TaskParams.model_validate(base))


async def image(runtime: DiffusersRuntime, j: Job) -> np.ndarray:
    result = await runtime.run(j, quiet)
    return pixels(result.images[0])


@pytest.mark.parametrize("model", ["tiny-a", "tiny-xl"])
async def test_past_75_tokens_the_prompt_still_counts(runtime: DiffusersRuntime, model: str) -> None:
    # diffusers alone cuts at 77 tokens: these two made the same image
    a = await image(runtime, job("a", model, prompt=LONG + "green"))
    b = await image(runtime, job("b", model, prompt=LONG + "violet"))
    assert np.abs(a - b).max() > 0
    c = await image(runtime, job("c", model, prompt="x", negative_prompt=LONG + "green"))
    d = await image(runtime, job("d", model, prompt="x", negative_prompt=LONG + "violet"))
    assert np.abs(c - d).max() > 0


@pytest.mark.parametrize("model", ["tiny-a", "tiny-xl"])
async def test_emphasis_changes_the_image_and_weight_one_does_not(
    runtime: DiffusersRuntime, model: str
) -> None:
    plain = await image(runtime, job("p", model, prompt="a red cat"))
    weighted = await image(runtime, job("w", model, prompt="a (red:1.8) cat"))
    assert np.abs(plain - weighted).max() > 0
    # weight 1 through the embeddings path: the image the pipeline makes from the text itself
    same = await image(runtime, job("s", model, prompt="(a red cat:1.0)"))
    assert np.abs(plain - same).max() <= 1


@pytest.mark.parametrize("model", ["tiny-a", "tiny-xl"])
@pytest.mark.parametrize("clip_skip", [None, 1])
def test_a_plain_prompts_embeddings_are_the_pipelines_own(
    catalog: ModelCatalog, model: str, clip_skip: int | None
) -> None:
    """What lets a plain prompt share a call with weighted ones: the same embeddings either way.
    The negative prompt is read as SD WebUI reads it, with clip skip too: as diffusers reads a
    prompt (its own encoding reads a negative prompt without clip skip)."""
    pipe = load_pipeline(catalog.resolve(model), "cpu", torch.float32)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        made = E.encode(pipe, "a red cat", "blurry", clip_skip)
        own = pipe.encode_prompt(
            prompt="a red cat",
            device=cpu,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt="blurry",
            clip_skip=clip_skip,
        )
        negative = pipe.encode_prompt(
            prompt="blurry",
            device=cpu,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            clip_skip=clip_skip,
        )
    assert made.chunks == 1
    assert torch.equal(made.prompt, own[0])
    assert made.negative is not None and torch.equal(made.negative, negative[0])
    assert torch.equal(made.negative, own[1]) == (clip_skip is None)
    if model == "tiny-xl":
        assert made.pooled is not None and torch.equal(made.pooled, own[2])
        assert made.negative_pooled is not None and torch.equal(made.negative_pooled, negative[2])


async def test_batch_mates_of_other_lengths_keep_their_images(runtime: DiffusersRuntime) -> None:
    jobs = [
        job("short", prompt="a red cat", seed=3),
        job("long", prompt=LONG + "green", seed=4),
        job("weighted", prompt="a (blue:1.4) dog", seed=5, batch_size=2),
        job("long2", prompt="[dull] " + LONG, seed=6),
    ]
    assert len({runtime.batch_key(j) for j in jobs}) == 1  # one batch, run as calls of equal length
    seen: list[float] = []

    async def progress(value: float) -> None:
        seen.append(value)

    batched = await runtime.run_batch(jobs, [progress, quiet, quiet, quiet])
    assert seen == sorted(seen) and seen[-1] == 1.0  # two calls, one progress from 0 to 1
    for j, outcome in zip(jobs, batched, strict=True):
        assert isinstance(outcome, RuntimeResult), outcome
        assert_same_images(outcome, await runtime.run(j, quiet))
        assert outcome.info["prompt"] == j.params.prompt  # as sent, brackets and all


def test_the_runtime_refuses_a_bad_weight_before_it_loads_anything(tmp_path: Path) -> None:
    empty = DiffusersRuntime.from_options(catalog=ModelCatalog(tmp_path), options={"device": "cpu"})
    with pytest.raises(Reject) as raised:
        check(empty.options, empty.catalog.models_dir, job("bad", prompt="(cat:1..2)"))
    assert raised.value.code == "invalid_params"


def test_emphasis_modes_read_the_pieces_as_sd_webui_does() -> None:
    prompt = "a (red:1.8) \\(cat\\) BREAK [dog]"
    weighted = [("a ", 1.0), ("red", 1.8), (" (cat)", 1.0), ("BREAK", -1.0), ("", 1.0), ("dog", 0.909091)]
    assert pairs(prompt) == weighted
    ignored = [("BREAK", -1.0) if p.brk else (p.text, p.weight) for p in S.pieces(prompt, "Ignore")]
    assert ignored == [("a red (cat)", 1.0), ("BREAK", -1.0), ("dog", 1.0)]  # BREAK kept, weights 1
    assert [(p.text, p.weight) for p in S.pieces(prompt, "None")] == [(prompt, 1.0)]  # characters all
    assert S.plain(prompt, "None") and not S.plain(prompt, "Ignore")
    assert S.emphasis_of({"override_settings": {"emphasis": "No norm"}}) == "No norm"
    with pytest.raises(Reject, match=r"override_settings\.emphasis must be one of Original, No norm") as e:
        S.emphasis_of({"override_settings": {"emphasis": "Loud"}})
    assert e.value.code == "invalid_params"


@pytest.mark.parametrize("model", ["tiny-a", "tiny-xl"])
async def test_override_settings_emphasis_is_taken(runtime: DiffusersRuntime, model: str) -> None:
    """It was refused (``unsupported_option: override_settings.emphasis``), "No norm" included,
    which SD WebUI suggests for SDXL."""

    def mode(name: str) -> dict[str, object]:
        return {"extra": {"override_settings": {"emphasis": name}}}

    prompt = "a (red:1.8) cat"
    original = await image(runtime, job("o", model, prompt=prompt))
    no_norm = await image(runtime, job("n", model, prompt=prompt, **mode("No norm")))
    assert np.abs(original - no_norm).max() > 0  # the mean is not put back
    ignored = await image(runtime, job("i", model, prompt=prompt, **mode("Ignore")))
    unweighted = await image(runtime, job("u", model, prompt="a red cat"))
    assert np.abs(ignored - unweighted).max() <= 1
    literal = await runtime.run(job("l", model, prompt=prompt, **mode("None")), quiet)
    assert np.abs(pixels(literal.images[0]) - original).max() > 0  # brackets as characters
    assert literal.info["infotexts"][0].endswith(f", Emphasis: None, Version: {VERSION}")  # SD WebUI's words
    plain = await runtime.run(job("p", model, prompt="a red cat", **mode("None")), quiet)
    assert "Emphasis" not in plain.info["infotexts"][0]  # said only where brackets are
