"""SD WebUI's saved prompt styles (a task's ``styles``) in the diffusers runtime and ``runtime
serve``: refused by name before (``unsupported_option``). ``tests/data/styles.csv`` holds the
styles; the interop suite puts the same file beside the real SD WebUI and compares its infotexts."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fakes.servers import ServerThread, a1111_server, free_port
from fakes.tiny import STYLES as CSV
from fakes.tiny import no_progress, tiny_diffusers
from sdfleet.errors import Reject
from sdfleet.runtimes import _styles as ST
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.runtimes.unsupported import refuse
from sdfleet.tasks import TaskParams, TaskType


def test_the_file_reads_as_sd_webui_reads_it(tmp_path: Path) -> None:
    styles = ST.read(CSV)
    assert list(styles) == [
        "sdfleet-cinematic",
        "sdfleet-appended",
        "sdfleet-negative-only",
        "sdfleet-editing",
    ]
    assert styles["sdfleet-appended"] == ST.Style("sdfleet-appended", "  masterpiece, best quality  ", "")
    old = tmp_path / "old.csv"  # an older file's "text" column, a BOM, no negative prompts
    old.write_text("\ufeffname,text\nolder,old text\n", encoding="utf-8")
    assert ST.read(old) == {"older": ST.Style("older", "old text", "")}


@pytest.mark.parametrize(
    ("style", "prompt", "merged"),
    [
        ("cinematic still of {prompt}, grain", "a cat", "cinematic still of a cat, grain"),
        ("  masterpiece  ", "  a cat ", "a cat, masterpiece"),  # stripped, joined with ", "
        ("", " a cat ", "a cat"),  # an empty style still strips the prompt
        ("masterpiece", "", "masterpiece"),
        ("{prompt} and {prompt}", "x", "x and x"),
    ],
)
def test_merge_is_sd_webuis(style: str, prompt: str, merged: str) -> None:
    assert ST.merge(style, prompt) == merged


def params(**extra: object) -> TaskParams:
    return TaskParams(
        prompt="a cat", negative_prompt="dark", steps=2, width=64, height=64, seed=3, extra=extra
    )


def test_styles_apply_in_turn_to_every_prompt() -> None:
    styles = ST.read(CSV)
    p = ST.apply(params(styles=["sdfleet-cinematic", "sdfleet-appended"]), styles)
    assert p.prompt == "cinematic still of a cat, film grain, masterpiece, best quality"
    assert p.negative_prompt == "dark, cartoon, lowres"
    assert p.extra["styles"] == ["sdfleet-cinematic", "sdfleet-appended"]
    hires = ST.apply(
        params(styles=["sdfleet-negative-only"], hr_prompt="a dog", hr_negative_prompt=""), styles
    )
    assert (hires.prompt, hires.negative_prompt) == ("a cat", "blurry, dark, jpeg artifacts")
    assert (hires.extra["hr_prompt"], hires.extra["hr_negative_prompt"]) == (
        "a dog",
        "",
    )  # empty: the first pass's
    assert ST.apply(params(), styles) == params()


def test_unknown_names_and_bad_values_are_refused_with_a_reason() -> None:
    with pytest.raises(Reject, match=r"no prompt style named 'nope' in the models folder's styles.csv") as e:
        ST.apply(params(styles=["sdfleet-appended", "nope"]), ST.read(CSV))
    assert e.value.code == "invalid_params" and "sdfleet-appended" in e.value.reason
    for bad in ("sdfleet-appended", [1], {"a": 1}):
        with pytest.raises(Reject, match="styles must be a list of style names") as e:
            refuse("diffusers", TaskType.TEXT_TO_IMAGE, params(styles=bad))
        assert e.value.code == "invalid_params"
    refuse("diffusers", TaskType.TEXT_TO_IMAGE, params(styles=["any name: the runtime's to know"]))


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    return tiny_diffusers(tmp_path_factory.mktemp("models"), styles=True)


def job(p: TaskParams) -> Job:
    return Job("t", TaskType.TEXT_TO_IMAGE, None, p)


async def test_the_runtime_makes_the_styled_prompts_image(runtime: DiffusersRuntime) -> None:
    styled = await runtime.run(job(params(styles=["sdfleet-cinematic"])), no_progress)
    written = params(extra={}).model_copy(
        update={
            "prompt": "cinematic still of a cat, film grain",
            "negative_prompt": "dark, cartoon, lowres",
        }
    )
    plain = await runtime.run(job(written), no_progress)
    assert styled.images == plain.images  # the same pixels and the same infotext
    said = styled.info["infotexts"][0]
    assert said.startswith("cinematic still of a cat, film grain\nNegative prompt: dark, cartoon, lowres\n")
    # a style that brings prompt editing makes its task run alone, as the written-out prompt does
    edited = job(params(styles=["sdfleet-editing"]))
    assert runtime.batch_key(edited) is None and runtime.batch_key(job(params())) is not None
    with pytest.raises(Reject, match="no prompt style named 'missing'"):
        await runtime.run(job(params(styles=["missing"])), no_progress)


async def test_the_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    runtime = tiny_diffusers(tmp_path)
    with pytest.raises(Reject, match=r"\(styles there: none\)"):
        await runtime.run(job(params(styles=["late"])), no_progress)
    (tmp_path / ST.FILE).write_text("name,prompt,negative_prompt\nlate,{prompt} at night,\n")
    made = await runtime.run(job(params(styles=["late"])), no_progress)
    assert made.info["infotexts"][0].startswith("a cat at night\n")


def test_a_file_that_does_not_read_is_said_and_holds_no_styles(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent asks for the styles while it groups tasks (``batch_key``): a broken file must not
    raise there. The task then fails naming the style, and the log says why."""
    (tmp_path / ST.FILE).write_bytes(b"name,prompt\nbad,\xff\xfe not utf-8\n")
    with caplog.at_level(logging.WARNING, logger="sdfleet.runtimes._styles"):
        assert ST.Styles(tmp_path).all() == {}
    assert "prompt styles" in caplog.text and "not read" in caplog.text
    runtime = tiny_diffusers(tmp_path)
    assert runtime.batch_key(job(params(styles=["bad"]))) is None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("models")
    shutil.copy(CSV, root / ST.FILE)
    srv = a1111_server(root, free_port())
    yield srv
    srv.stop()


def test_runtime_serve_lists_and_applies_them_as_sd_webui_does(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url, timeout=300) as http:
        listed = http.get("/sdapi/v1/prompt-styles").json()
        body = {
            "prompt": "a cat",
            "negative_prompt": "dark",
            "steps": 1,
            "width": 64,
            "height": 64,
            "seed": 2,
        }
        made = http.post(
            "/sdapi/v1/txt2img", json=body | {"styles": ["sdfleet-cinematic", "sdfleet-appended"]}
        )
        unknown = http.post("/sdapi/v1/txt2img", json=body | {"styles": ["nope"]})
    assert listed[0] == {
        "name": "sdfleet-cinematic",
        "prompt": "cinematic still of {prompt}, film grain",
        "negative_prompt": "cartoon, lowres",
    }
    assert [s["name"] for s in listed] == list(ST.read(CSV))
    assert made.status_code == 200, made.text
    info = json.loads(made.json()["info"])
    styled = "cinematic still of a cat, film grain, masterpiece, best quality"
    # SD WebUI's info says the styled prompts (its server, test_styles_interop)
    assert (info["prompt"], info["all_prompts"], info["styles"]) == (
        styled,
        [styled],
        ["sdfleet-cinematic", "sdfleet-appended"],
    )
    assert info["negative_prompt"] == "dark, cartoon, lowres" == info["all_negative_prompts"][0]
    assert info["infotexts"][0].startswith(f"{styled}\nNegative prompt: dark, cartoon, lowres\n")
    assert unknown.status_code == 422 and "no prompt style named 'nope'" in unknown.text
