"""Model upscalers in the diffusers runtime: tiny random-weight ESRGAN models built offline with
spandrel's own architecture class, saved as .pth and .safetensors (CPU, images of a few hundred
pixels)."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdfleet.compat import v1alpha2
from sdfleet.errors import Interrupted, Reject
from sdfleet.models import ModelCatalog, make_tiny
from sdfleet.runtimes._diffusers_opts import DiffusersOptions
from sdfleet.runtimes._upscale_models import ModelCache, import_spandrel, run_tiled
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType
from seed_payloads import V1ALPHA2_EXTRA_SINGLE_IMAGE


def tiny_esrgan(scale: int, seed: int) -> dict[str, torch.Tensor]:
    spandrel = import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    assert spandrel.__version__
    torch.manual_seed(seed)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)
    return {k: v.contiguous() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny(root, "tiny-a", seed=0)
    (root / "ESRGAN").mkdir()
    (root / "RealESRGAN").mkdir()
    # Real-ESRGAN's releases wrap their weights in "params_ema", as this one does.
    torch.save({"params_ema": tiny_esrgan(4, 0)}, root / "RealESRGAN" / "RealESRGAN_x4plus.pth")
    torch.save(tiny_esrgan(4, 1), root / "ESRGAN" / "4x-Tiny.pth")
    save_file(tiny_esrgan(2, 2), str(root / "ESRGAN" / "2x-Tiny.safetensors"))
    (root / "ESRGAN" / "readme.txt").write_text("not a model")
    save_file({"weight": torch.zeros(3, 3)}, str(root / "ESRGAN" / "Mystery.safetensors"))
    return root


def make_runtime(models_dir: Path, **options: object) -> DiffusersRuntime:
    opts = DiffusersOptions.parse({"device": "cpu", **options})
    return DiffusersRuntime(ModelCatalog(models_dir), options=opts)


@pytest.fixture(scope="module")
def runtime(models_dir: Path) -> DiffusersRuntime:
    return make_runtime(models_dir, upscale_tile=0)


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def extra(upscaler: str | None, factor: float, *images: bytes, task_id: str = "t-1", **more: object) -> Job:
    """An extras job; ``more`` are SD WebUI's other extras fields (``TaskParams.extra``)."""
    kind = TaskType.EXTRA_BATCH_IMAGES if len(images) > 1 else TaskType.EXTRA_SINGLE_IMAGE
    params = TaskParams(upscaler=upscaler, upscaling_resize=factor, extra=more)
    return Job(task_id, kind, None, params, init_images=list(images))


async def no_progress(value: float) -> None:
    return None


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def direct(models_dir: Path, path: str, image: bytes) -> np.ndarray:
    """The model applied to the whole image by spandrel itself: what a tiled run must reproduce."""
    model = ModelCache("cpu", torch.float32).get(models_dir / path)
    source = torch.from_numpy(pixels(image)).permute(2, 0, 1)[None].float() / 255
    out = model(source)[0].permute(1, 2, 0).numpy()
    return (out * 255).round().astype(int)


def test_upscalers_listed_as_sd_webui_names_them(runtime: DiffusersRuntime) -> None:
    assert runtime.upscalers == [
        "None",
        "Lanczos",
        "Nearest",
        "2x-Tiny",
        "4x-Tiny",
        "Mystery",
        "R-ESRGAN 4x+",
    ]


async def test_seed_extras_payload_runs_r_esrgan(runtime: DiffusersRuntime, models_dir: Path) -> None:
    task = v1alpha2.to_task(copy.deepcopy(V1ALPHA2_EXTRA_SINGLE_IMAGE), tenant="t")
    source = png(16, 12)
    job = Job(task.id, task.type, task.model, task.params, init_images=[source])
    result = await runtime.run(job, no_progress)
    assert result.info == {"upscaler": "R-ESRGAN 4x+", "upscaling_resize": 4.0}
    (image,) = result.images
    assert pixels(image).shape == (48, 64, 3)
    assert np.array_equal(pixels(image), direct(models_dir, "RealESRGAN/RealESRGAN_x4plus.pth", source))


@pytest.mark.parametrize("name", ["r-esrgan 4X+", "RealESRGAN_x4plus", " realesrgan_X4PLUS "])
async def test_names_match_like_sd_webui(runtime: DiffusersRuntime, name: str) -> None:
    result = await runtime.run(extra(name, 4, png(8, 8)), no_progress)
    assert result.info["upscaler"] == "R-ESRGAN 4x+"


async def test_unknown_upscaler_is_rejected_with_the_list(runtime: DiffusersRuntime) -> None:
    with pytest.raises(Reject) as caught:
        await runtime.run(extra("SwinIR_4x", 2, png(8, 8)), no_progress)
    assert caught.value.code == "unknown_upscaler"
    assert "Lanczos, Nearest, 2x-Tiny, 4x-Tiny, Mystery, R-ESRGAN 4x+" in caught.value.reason
    assert "ESRGAN" in caught.value.reason and "RealESRGAN" in caught.value.reason


async def test_a_file_that_is_no_upscaler_is_rejected(runtime: DiffusersRuntime) -> None:
    with pytest.raises(Reject) as caught:
        await runtime.run(extra("Mystery", 2, png(8, 8)), no_progress)
    assert caught.value.code == "bad_upscaler" and "Mystery.safetensors" in caught.value.reason


@pytest.mark.parametrize(
    ("name", "factor", "expected"),
    [
        ("4x-Tiny", 2, (32, 24)),  # one 4x pass, then Lanczos down to the asked size
        ("2x-Tiny", 8, (128, 96)),  # three 2x passes
        ("2x-Tiny", 2.5, (40, 30)),  # two passes (4x), then down
        ("Nearest", 2, (32, 24)),
    ],
)
async def test_passes_then_resize_to_the_asked_size(
    runtime: DiffusersRuntime, name: str, factor: float, expected: tuple[int, int]
) -> None:
    result = await runtime.run(extra(name, factor, png(16, 12), png(16, 12, seed=1)), no_progress)
    assert [Image.open(io.BytesIO(p)).size for p in result.images] == [expected, expected]


async def test_model_pass_matches_resize_of_its_output(runtime: DiffusersRuntime, models_dir: Path) -> None:
    source = png(16, 12)
    result = await runtime.run(extra("4x-Tiny", 2, source), no_progress)
    full = direct(models_dir, "ESRGAN/4x-Tiny.pth", source).astype(np.uint8)
    expected = Image.fromarray(full, "RGB").resize((32, 24), Image.Resampling.LANCZOS)
    assert np.array_equal(pixels(result.images[0]), np.asarray(expected).astype(int))


def test_tiles_with_enough_overlap_reproduce_the_whole_image(models_dir: Path) -> None:
    model = ModelCache("cpu", torch.float32).get(models_dir / "ESRGAN" / "4x-Tiny.pth")
    image = Image.open(io.BytesIO(png(40, 28)))
    seen: list[tuple[int, int]] = []
    tiled = run_tiled(model, image, 12, 32, lambda done, total: seen.append((done, total)))
    whole = run_tiled(model, image, 0, 0, lambda done, total: None)
    assert seen == [(n, 12) for n in range(1, 13)]  # 4 x 3 tiles
    diff = np.abs(np.asarray(tiled).astype(int) - np.asarray(whole).astype(int))
    assert tiled.size == (160, 112) and diff.max() <= 1


async def test_tiled_runtime_output_has_no_visible_seams(models_dir: Path, runtime: DiffusersRuntime) -> None:
    source = png(24, 20)
    tiled = await make_runtime(models_dir, upscale_tile=8).run(extra("4x-Tiny", 4, source), no_progress)
    whole = await runtime.run(extra("4x-Tiny", 4, source), no_progress)
    diff = np.abs(pixels(tiled.images[0]) - pixels(whole.images[0]))
    assert diff.mean() < 1.0  # the 8-pixel overlap leaves at most small differences at tile borders


@pytest.mark.parametrize(
    ("name", "factor", "size", "what"),
    [
        ("Lanczos", 8, (16, 12), "the upscaled image would be 128x96"),
        ("4x-Tiny", 1.5, (40, 40), "a model pass would be 160x160"),
        ("Nearest", 0.5, (128, 128), "the input image would be 128x128"),
    ],
)
async def test_outputs_over_the_pixel_limit_are_refused_before_running(
    models_dir: Path, name: str, factor: float, size: tuple[int, int], what: str
) -> None:
    small = make_runtime(models_dir, upscale_max_pixels=100 * 100)
    with pytest.raises(Reject) as caught:
        await small.run(extra(name, factor, png(*size)), no_progress)
    assert caught.value.code == "too_large" and what in caught.value.reason
    assert "upscale_max_pixels" in caught.value.reason


async def test_resize_to_a_size_crops_from_the_centre(runtime: DiffusersRuntime) -> None:
    source = png(16, 12)
    to = {"resize_mode": 1, "upscaling_resize_w": 40, "upscaling_resize_h": 40}
    cropped = await runtime.run(extra("4x-Tiny", 2, source, **to), no_progress)
    whole = await runtime.run(extra("4x-Tiny", 2, source, **to, upscaling_crop=False), no_progress)
    # scaled by max(40/16, 40/12) to 53x40 so that it covers 40x40, then cut from the middle
    assert pixels(whole.images[0]).shape == (40, 53, 3)
    assert np.array_equal(pixels(cropped.images[0]), pixels(whole.images[0])[:, 6:46])
    assert cropped.info["upscaling_resize_w"] == 40 and cropped.info["upscaling_crop"] is True


async def test_second_upscaler_is_blended_in(runtime: DiffusersRuntime) -> None:
    source = png(16, 12)
    lanczos = await runtime.run(extra("Lanczos", 2, source), no_progress)
    model = await runtime.run(extra("4x-Tiny", 2, source), no_progress)
    both = await runtime.run(
        extra("Lanczos", 2, source, upscaler_2="4x-tiny", extras_upscaler_2_visibility=0.25), no_progress
    )
    a, b = (Image.open(io.BytesIO(r.images[0])) for r in (lanczos, model))
    assert np.array_equal(pixels(both.images[0]), np.asarray(Image.blend(a, b, 0.25)).astype(int))
    assert both.info["upscaler_2"] == "4x-Tiny"
    for off in ({"upscaler_2": "4x-Tiny"}, {"upscaler_2": "None", "extras_upscaler_2_visibility": 0.5}):
        alone = await runtime.run(extra("Lanczos", 2, source, **off), no_progress)
        assert alone.images == lanczos.images


@pytest.mark.parametrize(
    ("more", "reason"),
    [
        ({"gfpgan_visibility": 0.5}, "face restoration (GFPGAN, CodeFormer) is not available"),
        ({"codeformer_visibility": 1}, "face restoration (GFPGAN, CodeFormer) is not available"),
        ({"resize_mode": 2}, "resize_mode must be 0"),
        ({"resize_mode": 1, "upscaling_resize_w": 0}, "upscaling_resize_w must be a whole number"),
        ({"extras_upscaler_2_visibility": 2}, "between 0 and 1"),
        ({"upscaler_2": "SwinIR", "extras_upscaler_2_visibility": 0.5}, "upscaler 'SwinIR' is not available"),
    ],
)
async def test_extras_it_cannot_do_are_refused(
    runtime: DiffusersRuntime, more: dict[str, object], reason: str
) -> None:
    with pytest.raises(Reject, match=re.escape(reason)):
        await runtime.run(extra("Lanczos", 2, png(8, 8), **more), no_progress)


async def _behind_a_generation(rt: DiffusersRuntime, events: list[str]) -> tuple[asyncio.Task, asyncio.Task]:
    """A generation holding the device, and an upscale started behind it (once it waits)."""

    async def gen_progress(value: float) -> None:
        if value >= 1.0:
            events.append("generation done")

    async def up_progress(value: float) -> None:
        events.append("upscale progress")

    params = TaskParams(prompt="a cat", steps=4, width=64, height=64, seed=1)
    gen = asyncio.create_task(rt.run(Job("gen", TaskType.TEXT_TO_IMAGE, "tiny-a", params), gen_progress))
    while not rt._lock.locked():
        await asyncio.sleep(0.005)
    up = asyncio.create_task(rt.run(extra("4x-Tiny", 4, png(16, 16), task_id="up"), up_progress))
    while not any("up" in ctl.task_ids for ctl in rt._active):
        await asyncio.sleep(0.005)
    assert not gen.done()
    return gen, up


async def test_model_upscale_waits_for_the_device(models_dir: Path) -> None:
    rt = make_runtime(models_dir, upscale_tile=4)
    events: list[str] = []
    gen, up = await _behind_a_generation(rt, events)
    await gen
    assert len((await up).images) == 1
    assert events[0] == "generation done" and events[1:] and set(events[1:]) == {"upscale progress"}


async def test_model_upscale_interrupted_while_waiting_stops(models_dir: Path) -> None:
    rt = make_runtime(models_dir, upscale_tile=4)
    events: list[str] = []
    gen, up = await _behind_a_generation(rt, events)
    await rt.interrupt("up")
    await gen
    with pytest.raises(Interrupted):
        await up
    assert events == ["generation done"]  # not a tile of it was reported
    done = await rt.run(extra("4x-Tiny", 4, png(16, 16), task_id="up2"), no_progress)
    assert len(done.images) == 1


def test_spandrel_import_leaves_no_torchvision_stand_in() -> None:
    import_spandrel()
    if importlib.util.find_spec("torchvision") is None:
        assert not any(name.split(".")[0] == "torchvision" for name in sys.modules)


def test_upscale_options_are_checked() -> None:
    with pytest.raises(ValueError, match="upscale_tile"):
        DiffusersOptions.parse({"upscale_tile": -1})
    with pytest.raises(ValueError, match="upscale_max_pixels"):
        DiffusersOptions.parse({"upscale_max_pixels": 0})


def test_runtime_serve_lists_and_runs_the_model_upscalers(models_dir: Path) -> None:
    """`sdfleet runtime serve` hands an extras request naming a model upscaler to the runtime: the
    same pixels as the runtime's own extras job, SD WebUI's infotext, SD WebUI's error body."""
    import base64

    import httpx

    from fakes.servers import ServerThread, free_port
    from sdfleet.runtime_server import create_app

    source = png(24, 16, seed=5)
    expected = asyncio.run(make_runtime(models_dir).run(extra("R-ESRGAN 4x+", 2, source), no_progress))
    srv = ServerThread(create_app(make_runtime(models_dir), ModelCatalog(models_dir)), free_port()).start()
    try:
        api = f"{srv.url}/sdapi/v1"
        listed = httpx.get(f"{api}/upscalers", timeout=30).json()
        names = [u["name"] for u in listed]
        assert names[:3] == ["None", "Lanczos", "Nearest"] and "R-ESRGAN 4x+" in names and "4x-Tiny" in names
        body = {
            "image": base64.b64encode(source).decode(),
            "upscaler_1": "R-ESRGAN 4x+",
            "upscaling_resize": 2,
        }
        r = httpx.post(f"{api}/extra-single-image", json=body, timeout=120)
        assert r.status_code == 200, r.text
        made = base64.b64decode(r.json()["image"])
        assert Image.open(io.BytesIO(made)).size == (48, 32)
        assert (pixels(made) == pixels(expected.images[0])).all()
        assert "Postprocess upscale by: 2.0, Postprocess upscaler: R-ESRGAN 4x+" in r.json()["html_info"]
        assert "Postprocess upscaler: R-ESRGAN 4x+" in Image.open(io.BytesIO(made)).info["postprocessing"]
        unknown = httpx.post(f"{api}/extra-single-image", json={**body, "upscaler_1": "NoSuch"}, timeout=30)
        assert unknown.status_code == 422 and unknown.json()["error"] == "AssertionError", unknown.text
        assert "NoSuch" in unknown.json()["errors"]
    finally:
        srv.stop()
