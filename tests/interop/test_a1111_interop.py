"""The ``a1111`` runtime against a real SD WebUI (AUTOMATIC1111), when ``SDFLEET_A1111_URL`` is set.

Run: ``SDFLEET_A1111_URL=http://127.0.0.1:7860 pytest tests/interop/test_a1111_interop.py``, with SD
WebUI started with ``--api`` (docs/runtimes.md says how to run v1.10.1 here, offline, on CPU).
Written for a small checkpoint at 64x64 and 2 steps: on CPU each image still takes seconds. The
server's settings are left as they were found (the runtime only pins the value it shows).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from PIL import Image

from real_servers import A1111_URL, needs_a1111
from sdfleet import hires, variation
from sdfleet.errors import Interrupted, Reject
from sdfleet.media import infotext, reencode
from sdfleet.runtimes.a1111 import A1111Runtime
from sdfleet.runtimes.base import Job
from sdfleet.tasks import TaskParams, TaskType

URL = A1111_URL
pytestmark = [needs_a1111, pytest.mark.timeout(900)]
CLIP = "CLIP_stop_at_last_layers"


class Sent:
    """Requests the runtime sends, in order, and the answers to generation calls."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    async def request(self, request: httpx.Request) -> None:
        self.log.append((request.method, request.url.path))

    async def response(self, response: httpx.Response) -> None:
        if response.request.method == "POST" and response.request.url.path.endswith(("txt2img", "img2img")):
            self.log.append(("answered", response.request.url.path))

    def count(self, method: str, path: str) -> int:
        return self.log.count((method, path))


@pytest.fixture
async def sent() -> Sent:
    return Sent()


@pytest.fixture
async def runtime(sent: Sent) -> AsyncIterator[A1111Runtime]:
    hooks = {"request": [sent.request], "response": [sent.response]}
    client = httpx.AsyncClient(base_url=URL, timeout=600, event_hooks=hooks)
    rt = A1111Runtime(client, poll_s=0.2, ready_timeout_s=60)
    await rt.start()
    yield rt
    await rt.aclose()


def png(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (40, 160, 90)).save(buf, format="PNG")
    return buf.getvalue()


def job(kind: TaskType = TaskType.TEXT_TO_IMAGE, name: str = "t", **params: Any) -> Job:
    init = params.pop("init", [])
    model = params.pop("model", None)
    base: dict[str, Any] = {
        "prompt": "a cat",
        "steps": 2,
        "width": 64,
        "height": 64,
        "seed": 1234,
        "sampler": "Euler",
    }
    if kind not in (TaskType.TEXT_TO_IMAGE, TaskType.IMAGE_TO_IMAGE):
        base.pop("sampler")
    base.update(params)
    return Job(name, kind, model, TaskParams.model_validate(base), init_images=init)


async def none(_: float) -> None:
    return None


def size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


async def options() -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=URL, timeout=60) as client:
        data: dict[str, Any] = (await client.get("/sdapi/v1/options")).json()
        return data


async def test_txt2img_img2img_and_seeds(runtime: A1111Runtime) -> None:
    t2i = await runtime.run(job(batch_size=2), none)
    assert [size(i) for i in t2i.images] == [(64, 64), (64, 64)]
    assert t2i.seed == 1234 and t2i.info["all_seeds"] == [1234, 1235] and t2i.info["sampler_name"] == "Euler"
    i2i = await runtime.run(job(TaskType.IMAGE_TO_IMAGE, init=[png()], denoising_strength=0.5), none)
    assert [size(i) for i in i2i.images] == [(64, 64)] and i2i.info["denoising_strength"] == 0.5


async def test_defect_1_clip_skip_sent_every_time_nothing_left_behind(runtime: A1111Runtime) -> None:
    before = (await options())[CLIP]
    two = await runtime.run(job(clip_skip=2), none)
    one = await runtime.run(job(clip_skip=1), none)
    assert (two.info["clip_skip"], one.info["clip_skip"]) == (2, 1)
    assert "Clip skip: 2" in two.info["infotexts"][0] and "Clip skip" not in one.info["infotexts"][0]
    assert (await options())[CLIP] == before


async def test_defect_2_unknown_sampler_refused(runtime: A1111Runtime, sent: Sent) -> None:
    with pytest.raises(Reject) as bad:
        await runtime.run(job(sampler="NoSuchSampler"), none)
    assert bad.value.code == "unknown_sampler" and "DPM++ 2M" in bad.value.reason
    with pytest.raises(Reject) as schedule:
        await runtime.run(job(extra={"scheduler": "NoSuchScheduler"}), none)
    assert schedule.value.code == "unknown_scheduler"
    assert sent.count("POST", "/sdapi/v1/txt2img") == 0
    karras = await runtime.run(job(sampler="DPM++ 2M Karras"), none)
    assert karras.info["sampler_name"] == "DPM++ 2M"
    assert karras.info["extra_generation_params"] == {"Schedule type": "Karras"}


async def test_defect_3_extras_send_what_the_task_says(runtime: A1111Runtime) -> None:
    plain = await runtime.run(job(TaskType.EXTRA_SINGLE_IMAGE, init=[png()]), none)
    assert size(plain.images[0]) == (64, 64) and plain.info["html_info"] == "<p></p>"
    double = await runtime.run(
        job(TaskType.EXTRA_BATCH_IMAGES, init=[png(), png()], upscaler="Lanczos", upscaling_resize=2), none
    )
    assert [size(i) for i in double.images] == [(128, 128), (128, 128)]


async def test_defect_4_deterministic_500s_fail_once(runtime: A1111Runtime, sent: Sent) -> None:
    with pytest.raises(Reject) as upscaler:
        await runtime.run(job(TaskType.EXTRA_SINGLE_IMAGE, init=[png()], upscaler="NoSuch"), none)
    assert upscaler.value.code == "unknown_upscaler" and "500 AssertionError" in upscaler.value.reason
    assert "could not find upscaler named NoSuch" in upscaler.value.reason
    with pytest.raises(Reject) as image:
        await runtime.run(job(TaskType.IMAGE_TO_IMAGE, init=[b"not an image"]), none)
    assert image.value.code == "invalid_image" and "Invalid encoded image" in image.value.reason
    assert sent.count("POST", "/sdapi/v1/extra-single-image") == sent.count("POST", "/sdapi/v1/img2img") == 1
    with pytest.raises(Reject) as infinite:  # its prompt reader: int(float("1e999"))
        await runtime.run(job(prompt="a [cat:dog:1e999]"), none)
    assert "500 OverflowError" in infinite.value.reason and "float infinity" in infinite.value.reason
    assert sent.count("POST", "/sdapi/v1/txt2img") == 1
    with pytest.raises(Reject) as deep:  # sdfleet refuses these before sending (SD WebUI: 500 RecursionError)
        await runtime.run(job(prompt="[" * 250 + "cat:dog:0.5" + "]" * 250), none)
    assert deep.value.code == "invalid_params" and sent.count("POST", "/sdapi/v1/txt2img") == 1


async def test_model_switch_by_file_name_and_stem(runtime: A1111Runtime) -> None:
    async with httpx.AsyncClient(base_url=URL, timeout=60) as client:
        models = (await client.get("/sdapi/v1/sd-models")).json()
    # docs/runtimes.md step 5: the suite's SD WebUI has two checkpoint names (hard links), so a
    # server without them is set up wrong, not a reason to pass without testing switches.
    assert len(models) >= 2, f"the SD WebUI at {URL} lists {len(models)} checkpoint(s); the suite needs two"
    first, second = models[0], models[1]
    start = runtime.switches
    a = await runtime.run(job(model=first["filename"].rsplit("/", 1)[-1]), none)
    b = await runtime.run(job(model=second["model_name"]), none)
    assert (a.info["sd_model_name"], b.info["sd_model_name"]) == (first["model_name"], second["model_name"])
    assert runtime.switches - start in (1, 2)


async def test_two_in_flight_and_interrupts(runtime: A1111Runtime, sent: Sent) -> None:
    reported: list[float] = []

    async def first_progress(value: float) -> None:
        reported.append(value)

    first = asyncio.create_task(runtime.run(job(name="first", steps=4), first_progress))
    second = asyncio.create_task(runtime.run(job(name="second"), none))
    third = asyncio.create_task(runtime.run(job(name="third", steps=4), none))
    for _ in range(6000):
        if sent.count("POST", "/sdapi/v1/txt2img") == 3:
            break
        await asyncio.sleep(0.05)
    await runtime.interrupt("third")  # queued at SD WebUI: stopped when it starts
    one, two = await first, await second
    assert len(one.images) == len(two.images) == 1 and any(0 < v < 1 for v in reported)
    with pytest.raises(Interrupted):
        await third
    posts = [i for i, e in enumerate(sent.log) if e == ("POST", "/sdapi/v1/txt2img")]
    answers = [i for i, e in enumerate(sent.log) if e == ("answered", "/sdapi/v1/txt2img")]
    assert posts[1] < answers[0]  # the next job waited at SD WebUI while the first ran
    assert sent.count("POST", "/sdapi/v1/interrupt") <= 1


async def test_reencoded_images_keep_an_infotext_sd_webui_reads(runtime: A1111Runtime) -> None:
    """An ``output_format`` JPEG or WebP of SD WebUI's own PNG carries its infotext where SD
    WebUI's PNG Info looks for it (EXIF ``UserComment``, read with piexif): the same text back."""
    made = (await runtime.run(job(), none)).images[0]
    async with httpx.AsyncClient(base_url=URL, timeout=60) as client:

        async def info(data: bytes, mime: str) -> str:
            body = {"image": f"data:{mime};base64,{base64.b64encode(data).decode()}"}
            r = await client.post("/sdapi/v1/png-info", json=body)
            assert r.status_code == 200, r.text
            return str(r.json()["info"])

        original = await info(made, "image/png")
        assert "Seed: 1234" in original, original
        for fmt, mime in (("jpeg", "image/jpeg"), ("webp", "image/webp")):
            assert await info(reencode(made, fmt), mime) == original, fmt  # type: ignore[arg-type]


async def test_images_come_back_in_the_samples_format_option() -> None:
    """What ``runtime serve`` now does (``tests/unit/test_a1111_server.py``), against the real one:
    ``samples_format`` webp or jpg gives that format with the infotext in EXIF. The option is put
    back as it was found."""
    async with httpx.AsyncClient(base_url=URL, timeout=600) as client:
        before = (await client.get("/sdapi/v1/options")).json()["samples_format"]
        body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler"}
        try:
            for fmt, pil in (("webp", "WEBP"), ("jpg", "JPEG")):
                assert (
                    await client.post("/sdapi/v1/options", json={"samples_format": fmt})
                ).status_code == 200
                made = (await client.post("/sdapi/v1/txt2img", json=body)).json()
                with Image.open(io.BytesIO(base64.b64decode(made["images"][0]))) as image:
                    assert image.format == pil and image.size == (64, 64)
                    assert infotext(image) == json.loads(made["info"])["infotexts"][0]
        finally:
            await client.post("/sdapi/v1/options", json={"samples_format": before})


HIRES_CASES = [
    (64, 64, {"hr_scale": 2}),
    (64, 96, {"hr_scale": 1.5}),
    (64, 64, {"hr_scale": 1.3}),
    (64, 96, {"hr_resize_y": 128}),
    (64, 64, {"hr_resize_x": 128, "hr_resize_y": 96}),
    (96, 64, {"hr_resize_x": 128, "hr_resize_y": 128}),
    (64, 64, {"hr_upscaler": "Lanczos", "hr_second_pass_steps": 2}),
    (64, 64, {"hr_upscaler": "Latent (nearest-exact)", "hr_sampler_name": "DDIM"}),
]


@pytest.mark.parametrize(("width", "height", "extra"), HIRES_CASES)
async def test_hires_sizes_and_words_are_sd_webuis(width: int, height: int, extra: dict[str, Any]) -> None:
    """What the diffusers runtime and ``runtime serve`` make of a hires fix (``sdfleet.hires``):
    the image's size and the infotext's hires words, next to the real SD WebUI's for the same
    request (SD WebUI's ``calculate_target_resolution`` crops and rounds down)."""
    body = {"prompt": "a cat", "steps": 2, "width": width, "height": height, "sampler_name": "Euler"}
    body |= {"seed": 1, "enable_hr": True, "denoising_strength": 0.5, **extra}
    async with httpx.AsyncClient(base_url=URL, timeout=600) as client:
        made = (await client.post("/sdapi/v1/txt2img", json=body)).json()
    text = json.loads(made["info"])["infotexts"][0]
    params = TaskParams(
        prompt="a cat", width=width, height=height, sampler="Euler", denoising_strength=0.5, extra=body
    )
    second = hires.plan(TaskType.TEXT_TO_IMAGE, params)
    assert second is not None
    assert size(base64.b64decode(made["images"][0])) == second.size
    said = ", ".join(f"{k}: {v}" for k, v in second.generation_params if v is not None)  # None: unsaid
    assert said in text, text


VARIATION_CASES = [
    {"subseed": 7, "subseed_strength": 0.4, "batch_size": 2},
    {"subseed": 7, "subseed_strength": 1, "n_iter": 2},
    {"seed_resize_from_w": 32, "seed_resize_from_h": 48},
    {"subseed": 9, "subseed_strength": 0.25, "seed_resize_from_w": 96, "seed_resize_from_h": 64},
    {"subseed": 9, "subseed_strength": 0, "seed_resize_from_w": 32, "batch_size": 2},
]


@pytest.mark.parametrize("extra", VARIATION_CASES)
async def test_variation_seeds_and_words_are_sd_webuis(extra: dict[str, Any]) -> None:
    """What the diffusers runtime and ``runtime serve`` make of variation seeds
    (``sdfleet.variation``): each image's seed and variation seed, and the infotext's words, next
    to the real SD WebUI's for the same request."""
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 1}
    body |= extra
    async with httpx.AsyncClient(base_url=URL, timeout=600) as client:
        made = (await client.post("/sdapi/v1/txt2img", json=body)).json()
    info = json.loads(made["info"])
    params = TaskParams(prompt="a cat", width=64, height=64, sampler="Euler", seed=1, extra=body)
    varied = variation.read(params)
    images = len(info["all_seeds"])
    assert images == body.get("batch_size", 1) * body.get("n_iter", 1)
    assert info["all_seeds"] == variation.seeds(1, images, varied)
    if varied is None:
        assert not any("Variation" in text or "Seed resize" in text for text in info["infotexts"])
        return
    if varied.subseed >= 0:  # else drawn at random, there and here
        assert info["all_subseeds"] == variation.subseeds(varied, images)
    for text, subseed in zip(info["infotexts"], info["all_subseeds"], strict=True):
        words = ", ".join(f"{k}: {v}" for k, v in variation.words(varied, subseed))
        assert f"Model: {info['sd_model_name']}, {words}, " in text, text


HIRES = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5}
SAME_IMAGE = [
    (
        {"prompt": "a cat:2", "cfg_scale": 3.0},
        {"prompt": "a cat", "cfg_scale": 6.0},
    ),  # the prompt's own weight
    ({"prompt": "a [cat:dog:0]"}, {"prompt": "a dog"}),  # edited from the start
    ({"prompt": "a [cat:dog:1.0]"}, {"prompt": "a cat"}),  # edited after the last step
    ({"prompt": "a [cat|cat]"}, {"prompt": "a cat"}),  # alternation between equals
    (
        {"prompt": "a (red:1.8) cat", "override_settings": {"emphasis": "Ignore"}},
        {"prompt": "a red cat"},
    ),
    ({"prompt": "a cat", "hr_prompt": "a cat", **HIRES}, {"prompt": "a cat", **HIRES}),  # the same again
    # the second pass scheduled anew: [cat:dog:0.5] is a dog all through it, [cat:dog:1.5] a cat
    # all through the first pass
    ({"prompt": "a [cat:dog:0.5]", **HIRES}, {"prompt": "a [cat:dog:0.5]", "hr_prompt": "a dog", **HIRES}),
    ({"prompt": "a [cat:dog:1.5]", **HIRES}, {"prompt": "a cat", "hr_prompt": "a [cat:dog:1.5]", **HIRES}),
    # Heun: editing scheduled over twice the steps (its passes)
    (
        {"prompt": "a [cat:dog:0.5]", "sampler_name": "Heun", "steps": 4},
        {"prompt": "a [cat:dog:4]", "sampler_name": "Heun", "steps": 4},
    ),
]
OTHER_IMAGE = [
    ({"prompt": "a cat AND a dog"}, {"prompt": "a cat and a dog"}),  # composable diffusion
    ({"prompt": "a [cat:dog:0.5]"}, {"prompt": "a cat"}),
    (
        {"prompt": "a (red:1.8) cat", "override_settings": {"emphasis": "No norm"}},
        {"prompt": "a (red:1.8) cat"},
    ),
    ({"prompt": "a cat", "hr_prompt": "a dog", **HIRES}, {"prompt": "a cat", **HIRES}),  # its own
    ({"prompt": "a [cat:dog:1.5]", **HIRES}, {"prompt": "a cat", **HIRES}),  # a dog late in its second
    (
        {"prompt": "a [cat:dog:0.5]", "sampler_name": "Heun", "steps": 4},
        {"prompt": "a [cat:dog:2]", "sampler_name": "Heun", "steps": 4},
    ),
]


@pytest.mark.parametrize(("one", "other"), SAME_IMAGE + OTHER_IMAGE)
async def test_what_sd_webui_reads_in_a_prompt_is_what_sdfleet_reads(
    one: dict[str, Any], other: dict[str, Any]
) -> None:
    """The readings the diffusers runtime and ``runtime serve`` take from SD WebUI (a prompt's
    own weight scales the CFG scale, prompt editing's ends, alternation, emphasis modes,
    ``AND``, a hires fix's own prompt, editing in its second pass and with a two-pass sampler):
    pairs that make the same image on the real SD WebUI, and pairs that do not; the unit tests
    hold the diffusers runtime to the same (``test_diffusers_prompt_editing``,
    ``test_diffusers_prompts``, ``test_diffusers_hires``)."""
    base = {"steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}
    # The random checkpoint overflows on "dog" at clip skip 1 for every seed tried (5 to 15: 500
    # NansException), not at 2. Saved first, so that SD WebUI puts it back after each job.
    clip = {"CLIP_stop_at_last_layers": 2}
    async with httpx.AsyncClient(base_url=URL, timeout=600) as client:
        (await client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})).raise_for_status()
        for seed in (7, 8, 9):  # a random checkpoint's UNet overflows on some (500 NansException)
            made = [
                (
                    await client.post(
                        "/sdapi/v1/txt2img",
                        json=base
                        | {"seed": seed}
                        | body
                        | {"override_settings": clip | body.get("override_settings", {})},
                    )
                ).json()
                for body in (one, other)
            ]
            if not any(m.get("error") == "NansException" for m in made):
                break
    images = [Image.open(io.BytesIO(base64.b64decode(m["images"][0]))).convert("RGB").tobytes() for m in made]
    assert (images[0] == images[1]) is ((one, other) in SAME_IMAGE), (one, other)
