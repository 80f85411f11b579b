"""The ``a1111`` runtime against ``sdfleet runtime serve`` over real HTTP on 127.0.0.1.

The server answers client mistakes with SD WebUI's own status codes here (``sdwebui_status``: the
500s the runtime must classify), and every body the runtime sends is validated against mirrors of
SD WebUI 1.10.1's request models. The four ``test_defect_*`` tests fail on the runtime of main
before issue 16 (checked by running them with its ``a1111.py`` and ``_a1111_payload.py``).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from fakes.a1111_models import REQUEST_MODELS
from fakes.servers import ServerThread, a1111_server, free_port
from sdfleet.errors import InputUnavailable, ModelLoadError, Reject, RuntimeFailure
from sdfleet.guarded_http import InputFetcher
from sdfleet.models import ModelCatalog
from sdfleet.runtimes import build_runtime
from sdfleet.runtimes.a1111 import A1111Runtime
from sdfleet.runtimes.base import Job
from sdfleet.tasks import TaskParams, TaskType

# Real servers with diffusers models: minutes on a busy 2-core machine.
pytestmark = pytest.mark.timeout(600)


def png(colour: tuple[int, int, int] = (10, 200, 30), size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("models")
    srv = a1111_server(root, free_port(), sdwebui_status=True)
    broken = root / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def images_server() -> Iterator[ServerThread]:
    async def image(_: Any) -> Response:
        return Response(png((1, 2, 3)), media_type="image/png")

    async def busy(_: Any) -> Response:
        return Response(b"try again later", status_code=503)

    routes = [Route("/cat.png", image), Route("/busy.png", busy)]
    srv = ServerThread(Starlette(routes=routes), free_port()).start()
    yield srv
    srv.stop()


class Recorder:
    """Every request the runtime sends; generation bodies are checked against SD WebUI's models."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []

    async def __call__(self, request: httpx.Request) -> None:
        body = json.loads(request.content) if request.content else None
        path = request.url.path
        self.requests.append((request.method, path, body))
        if path in REQUEST_MODELS:
            REQUEST_MODELS[path].model_validate(body)  # raises (fails the call) on a foreign field/type

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.requests if (m, p) == (method, path))

    def bodies(self, method: str, path: str) -> list[Any]:
        return [b for m, p, b in self.requests if (m, p) == (method, path)]

    def last(self, path: str) -> Any:
        return next(b for _, p, b in reversed(self.requests) if p == path)


def make_runtime(url: str, recorder: Recorder, **kwargs: Any) -> A1111Runtime:
    client = httpx.AsyncClient(base_url=url, timeout=60, event_hooks={"request": [recorder]})
    fetcher = InputFetcher(max_bytes=1 << 20, timeout_s=5, allow_private=False)
    return A1111Runtime(client, fetcher=fetcher, poll_s=0.02, ready_timeout_s=5, **kwargs)


@pytest.fixture
async def runtime(server: ServerThread) -> AsyncIterator[A1111Runtime]:
    recorder = Recorder()
    rt = make_runtime(server.url, recorder, default_model="tiny-a")
    rt.recorder = recorder  # type: ignore[attr-defined]
    await rt.start()
    yield rt
    await rt.aclose()


def job(kind: TaskType = TaskType.TEXT_TO_IMAGE, model: str | None = None, **params: Any) -> Job:
    init = params.pop("init", [])
    base: dict[str, Any] = {"prompt": "a red cat", "steps": 2, "width": 64, "height": 64, "seed": 9}
    base.update(params)
    return Job("t-1", kind, model, TaskParams.model_validate(base), init_images=init)


async def no_progress(_: float) -> None:
    return None


def size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def rec(runtime: A1111Runtime) -> Recorder:
    recorder: Recorder = runtime.recorder  # type: ignore[attr-defined]
    return recorder


async def test_every_task_type(runtime: A1111Runtime) -> None:
    t2i = await runtime.run(job(batch_size=2, sampler="DPM++ 2M Karras"), no_progress)
    again = await runtime.run(job(batch_size=2, sampler="DPM++ 2M Karras"), no_progress)
    assert [size(i) for i in t2i.images] == [(64, 64), (64, 64)] and t2i.images == again.images
    assert t2i.seed == 9 and t2i.info["all_seeds"] == [9, 10] and t2i.info["runtime"] == "a1111"
    assert t2i.info["sampler_name"] == "DPM++ 2M" and t2i.info["extra_generation_params"] == {
        "Schedule type": "Karras"
    }
    assert rec(runtime).last("/sdapi/v1/txt2img")["sampler_name"] == "DPM++ 2M Karras"
    i2i = await runtime.run(job(TaskType.IMAGE_TO_IMAGE, init=[png()], denoising_strength=0.5), no_progress)
    assert [size(i) for i in i2i.images] == [(64, 64)]
    sent = rec(runtime).last("/sdapi/v1/img2img")
    assert base64.b64decode(sent["init_images"][0]) == png() and sent["denoising_strength"] == 0.5
    single = await runtime.run(
        job(TaskType.EXTRA_SINGLE_IMAGE, init=[png()], upscaler="Lanczos", upscaling_resize=2), no_progress
    )
    assert [size(i) for i in single.images] == [(128, 128)]
    assert single.info["html_info"] == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos</p>"
    batch = await runtime.run(
        job(
            TaskType.EXTRA_BATCH_IMAGES,
            init=[png(), png((1, 1, 1))],
            upscaler="Nearest",
            upscaling_resize=0.5,
        ),
        no_progress,
    )
    assert [size(i) for i in batch.images] == [(32, 32), (32, 32)]
    names = [f["name"] for f in rec(runtime).last("/sdapi/v1/extra-batch-images")["imageList"]]
    assert names == ["image00001", "image00002"]
    assert sum(rec(runtime).count("POST", p) for p in REQUEST_MODELS) == 5  # each validated by the hook
    with pytest.raises(ValidationError):  # the mirrors are strict: a field SD WebUI lacks fails
        REQUEST_MODELS["/sdapi/v1/txt2img"].model_validate({**rec(runtime).last("/sdapi/v1/txt2img"), "x": 1})


async def test_defect_1_clip_skip_sent_every_time_and_never_left_behind(
    runtime: A1111Runtime, server: ServerThread
) -> None:
    # Another client (or an earlier job on SD WebUI, see the module docstring of _a1111_payload)
    # left clip skip 2 in the server's settings: a clip-skip-1 job must still run with 1.
    async with httpx.AsyncClient(base_url=server.url) as other:
        leave = await other.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
        assert leave.status_code == 200
        try:
            one = await runtime.run(job(clip_skip=1), no_progress)
            two = await runtime.run(job(clip_skip=2), no_progress)
            one_again = await runtime.run(job(clip_skip=1), no_progress)
            left = (await other.get("/sdapi/v1/options")).json()["CLIP_stop_at_last_layers"]
        finally:
            await other.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    assert [r.info["clip_skip"] for r in (one, two, one_again)] == [1, 2, 1]
    assert one.images == one_again.images != two.images
    sent = rec(runtime).bodies("POST", "/sdapi/v1/txt2img")
    assert [b["override_settings"]["CLIP_stop_at_last_layers"] for b in sent] == [1, 2, 1]
    assert all(b["override_settings_restore_afterwards"] is True for b in sent)
    assert left == 2.0  # the jobs put nothing into the server's settings
    # start() pinned the setting it overrides (so that a fresh SD WebUI restores it after jobs).
    assert rec(runtime).bodies("POST", "/sdapi/v1/options")[0] == {"CLIP_stop_at_last_layers": 1.0}


async def test_defect_2_unknown_sampler_or_scheduler_is_refused_with_the_list(runtime: A1111Runtime) -> None:
    with pytest.raises(Reject) as sampler:
        await runtime.run(job(sampler="No Such Sampler"), no_progress)
    assert sampler.value.code == "unknown_sampler" and "'No Such Sampler'" in sampler.value.reason
    assert "DPM++ 2M" in sampler.value.reason and "Euler a" in sampler.value.reason
    with pytest.raises(Reject) as schedule:
        await runtime.run(job(sampler="Euler", extra={"scheduler": "Weekly"}), no_progress)
    assert schedule.value.code == "unknown_scheduler" and "Karras" in schedule.value.reason
    assert rec(runtime).count("POST", "/sdapi/v1/txt2img") == 0  # refused before anything ran
    # Read once, and once more before each name is refused (SD WebUI may have gained it since).
    assert rec(runtime).count("GET", "/sdapi/v1/samplers") == 3
    # SD WebUI takes exact names only: aliases and other spellings are sent as its own name.
    await runtime.run(job(sampler="k_euler_a"), no_progress)
    await runtime.run(job(sampler="dpm++ 2m karras"), no_progress)
    await runtime.run(job(sampler="DPM++ 2M", extra={"scheduler": "karras"}), no_progress)
    sent = rec(runtime).bodies("POST", "/sdapi/v1/txt2img")
    assert [(b["sampler_name"], b.get("scheduler")) for b in sent] == [
        ("Euler a", None),
        ("DPM++ 2M Karras", None),
        ("DPM++ 2M", "Karras"),
    ]
    assert rec(runtime).count("GET", "/sdapi/v1/samplers") == 3  # known names: no new look-up


async def test_a_prompt_too_deep_or_too_long_for_sd_webui_is_refused_before_it_is_sent(
    runtime: A1111Runtime,
) -> None:
    """SD WebUI's reader holds its queue lock for 79 s over 1,000 levels, then answers 500; it
    reads a long prompt token by token under that lock too."""
    with pytest.raises(Reject, match="brackets nest 1000 deep: at most 100") as raised:
        await runtime.run(job(prompt="[" * 1000 + "cat:dog:0.5" + "]" * 1000), no_progress)
    assert raised.value.code == "invalid_params"
    with pytest.raises(Reject, match="at most 32,768") as raised:
        await runtime.run(job(negative_prompt="ugly, " * 10_000), no_progress)
    assert raised.value.code == "too_large"
    assert rec(runtime).count("POST", "/sdapi/v1/txt2img") == 0


async def test_defect_3_extras_send_what_the_task_says(runtime: A1111Runtime) -> None:
    plain = await runtime.run(job(TaskType.EXTRA_SINGLE_IMAGE, init=[png()]), no_progress)
    assert [size(i) for i in plain.images] == [(64, 64)] and plain.info["html_info"] == "<p></p>"
    assert "upscaler_1" not in rec(runtime).last("/sdapi/v1/extra-single-image")
    nearest = await runtime.run(
        job(TaskType.EXTRA_SINGLE_IMAGE, init=[png()], upscaler="Nearest", upscaling_resize=3), no_progress
    )
    assert [size(i) for i in nearest.images] == [(192, 192)]
    assert rec(runtime).last("/sdapi/v1/extra-single-image")["upscaler_1"] == "Nearest"


async def test_defect_4_deterministic_errors_fail_once_in_sd_webui_words(runtime: A1111Runtime) -> None:
    # The server answers these as SD WebUI does: 500 with the exception's name and words.
    with pytest.raises(Reject) as upscaler:
        await runtime.run(job(TaskType.EXTRA_SINGLE_IMAGE, init=[png()], upscaler="NoSuch"), no_progress)
    assert upscaler.value.code == "unknown_upscaler"
    assert "500 AssertionError" in upscaler.value.reason
    assert "could not find upscaler named NoSuch" in upscaler.value.reason
    with pytest.raises(Reject) as bad_image:
        await runtime.run(job(TaskType.IMAGE_TO_IMAGE, init=[b"not an image"]), no_progress)
    assert bad_image.value.code == "invalid_image" and "Invalid encoded image" in bad_image.value.reason
    with pytest.raises(Reject) as script:  # a 4xx: refused as well, in the server's words
        await runtime.run(job(extra={"alwayson_scripts": {"controlnet": {"args": []}}}), no_progress)
    assert "422" in script.value.reason and "always on script controlnet not found" in script.value.reason


def test_nans_fail_once_in_sd_webui_words() -> None:
    """What SD WebUI 1.10.1 answered (seen on the real server, random SD 1.5-shaped weights,
    64x64, seed 2) to a request whose UNet overflowed: the same request overflows again, so three
    tries would spend three runs on one failure."""
    from sdfleet.runtimes._a1111_errors import classify

    body = {
        "error": "NansException",
        "detail": "",
        "body": "",
        "errors": "A tensor with NaNs was produced in Unet. Use --disable-nan-check commandline argument "
        "to disable this check.",
    }
    request = httpx.Request("POST", "http://sdwebui/sdapi/v1/txt2img")
    error = classify("/sdapi/v1/txt2img", httpx.Response(500, json=body, request=request))
    assert isinstance(error, Reject) and error.code == "nan_output"
    assert "500 NansException" in error.reason and "--disable-nan-check" in error.reason


@pytest.mark.parametrize(
    ("error", "errors"),  # the real SD WebUI 1.10.1's answers to "a [cat:dog:1e999]" and to 250 levels
    [
        ("OverflowError", "cannot convert float infinity to integer"),
        ("RecursionError", "maximum recursion depth exceeded"),
    ],
)
def test_what_sd_webuis_prompt_reader_fails_on_fails_once(error: str, errors: str) -> None:
    """Its prompt reader fails on these prompts every time: they were retried as a passing fault."""
    from sdfleet.runtimes._a1111_errors import classify

    body = {"error": error, "detail": "", "body": "", "errors": errors}
    request = httpx.Request("POST", "http://sdwebui/sdapi/v1/txt2img")
    failed = classify("/sdapi/v1/txt2img", httpx.Response(500, json=body, request=request))
    assert isinstance(failed, Reject) and f"500 {error}" in failed.reason and errors in failed.reason


async def test_transient_failures_stay_retryable(runtime: A1111Runtime, tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure) as broken:  # a model that fails to load: 500, retryable
        await runtime.run(job(model="broken"), no_progress)
    assert "500 ModelLoadError" in broken.value.message and "broken" in broken.value.message
    assert len((await runtime.run(job(model="tiny-a"), no_progress)).images) == 1
    with pytest.raises(Reject) as pipeline:
        await runtime.run(job(TaskType.PIPELINE, workflow={"1": {}}), no_progress)
    assert pipeline.value.code == "unsupported_task"
    down = build_runtime(
        "a1111",
        catalog=ModelCatalog(tmp_path),
        options={"url": f"http://127.0.0.1:{free_port()}", "ready_timeout_s": 0.3},
    )
    assert isinstance(down, A1111Runtime) and down.max_in_flight == 2
    try:
        with pytest.raises(ModelLoadError, match="not ready"):
            await down.start()
        with pytest.raises(RuntimeFailure, match="unreachable"):
            await down.run(job(), no_progress)
    finally:
        await down.aclose()


async def test_model_switch_only_when_needed(runtime: A1111Runtime) -> None:
    def switches() -> list[Any]:
        return [b for b in rec(runtime).bodies("POST", "/sdapi/v1/options") if "sd_model_checkpoint" in b]

    assert switches() == []  # the WebUI had tiny-a already
    same = await runtime.run(job(model="tiny-a"), no_progress)
    assert same.switch_s == 0.0, "a lookup or a pinned setting is no switch: no model.switch span"
    b = await runtime.run(job(model="tiny-b"), no_progress)
    assert len(switches()) == 1 and b.info["sd_model_name"] == "tiny-b" and b.switch_s > 0.0
    title = runtime.loaded_model  # as SD WebUI listed it: no hash before it first loaded the file
    assert title == "tiny-b.safetensors"
    for name in ("tiny-b.safetensors", title, "tiny-b", "tiny-b.safetensors [0123456789]"):
        assert (await runtime.run(job(model=name), no_progress)).switch_s == 0.0
    assert switches() == [{"sd_model_checkpoint": title}]
    await runtime.run(job(model="tiny-a"), no_progress)
    assert len(switches()) == 2 and runtime.switches == 2
    with pytest.raises(Reject) as unknown:
        await runtime.run(job(model="no-such-model"), no_progress)
    assert unknown.value.code == "unknown_model"


async def test_urls_inlined_routing_keys_stripped_refused_url_fails(
    runtime: A1111Runtime, images_server: ServerThread
) -> None:
    extra: dict[str, Any] = {
        "alwayson_scripts": {"task": "text-to-image", "sd_model_checkpoint": "tiny-a", "id_task": "1"},
        "restore_faces": False,
        "override_settings": {"eta_noise_seed_delta": 0},
        "firstpass_image": f"{images_server.url}/cat.png",
    }
    with pytest.raises(Reject) as refused:  # 127.0.0.1 is not a public address
        await runtime.run(job(extra=extra), no_progress)
    assert refused.value.code == "url_refused" and rec(runtime).count("POST", "/sdapi/v1/txt2img") == 0
    assert runtime.fetcher is not None
    runtime.fetcher.allow_private = True
    busy = {**extra, "firstpass_image": f"{images_server.url}/busy.png"}
    with pytest.raises(InputUnavailable, match="HTTP 503") as unavailable:  # may come back: retried
        await runtime.run(job(extra=busy), no_progress)
    assert unavailable.value.code == "input_fetch_failed"
    assert rec(runtime).count("POST", "/sdapi/v1/txt2img") == 0
    await runtime.run(job(extra=extra, clip_skip=2), no_progress)
    body = rec(runtime).last("/sdapi/v1/txt2img")
    assert body["alwayson_scripts"] == {} and body["restore_faces"] is False
    assert base64.b64decode(body["firstpass_image"]) == png((1, 2, 3))
    assert body["override_settings"] == {"eta_noise_seed_delta": 0, "CLIP_stop_at_last_layers": 2}
    # A new override key is pinned once, with no job of ours at the server, before it is first sent.
    pins = [b for b in rec(runtime).bodies("POST", "/sdapi/v1/options") if "eta_noise_seed_delta" in b]
    assert pins == [{"eta_noise_seed_delta": 0}]


async def test_a_minimal_a1111_server_without_lists_or_progress() -> None:
    """Like the benchmark's fake SD WebUI (shared/bench/seed-agent): options, sd-models, txt2img only.
    Names go as given, progress polls are answered 404 and ignored, the job still runs."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    async def options(_: Request) -> JSONResponse:
        return JSONResponse({"sd_model_checkpoint": "fake.safetensors [deadbeef]"})

    async def txt2img(request: Request) -> JSONResponse:
        body = await request.json()
        info = {"seed": body["seed"], "job_timestamp": "20260101000000"}
        return JSONResponse(
            {"images": [base64.b64encode(png()).decode()], "parameters": body, "info": json.dumps(info)}
        )

    app = Starlette(
        routes=[Route("/sdapi/v1/options", options), Route("/sdapi/v1/txt2img", txt2img, methods=["POST"])]
    )
    srv = ServerThread(app, free_port()).start()
    recorder = Recorder()
    rt = make_runtime(srv.url, recorder)
    try:
        await rt.start()
        result = await rt.run(job(sampler="DPM++ 2M Karras"), no_progress)
        assert result.seed == 9 and size(result.images[0]) == (64, 64)
        assert recorder.last("/sdapi/v1/txt2img")["sampler_name"] == "DPM++ 2M Karras"
        assert recorder.count("GET", "/sdapi/v1/samplers") == 1
    finally:
        await rt.aclose()
        srv.stop()
