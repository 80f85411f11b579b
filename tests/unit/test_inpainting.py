"""Inpainting (an image-to-image task's ``mask``) in the diffusers runtime and ``runtime serve``, as
SD WebUI 1.10.1 does it. It was refused (``unsupported_option``), though SD WebUI's API does it by
default whenever a mask is given. The image work is checked against SD WebUI's own code
(``tests/data/inpaint-sdwebui-1.10.1.json``, made with its ``cv2`` and ``modules/masking.py``)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from fakes.servers import ServerThread, a1111_server, free_port
from fakes.tiny import no_progress, tiny_diffusers, with_inpainting_unet
from sdfleet import inpaint
from sdfleet.errors import Reject
from sdfleet.infotext import VERSION
from sdfleet.runtimes import _inpaint_images as I
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.runtimes.unsupported import refuse
from sdfleet.tasks import TaskParams, TaskType

REAL: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parent.parent / "data" / "inpaint-sdwebui-1.10.1.json").read_text()
)
I2I = TaskType.IMAGE_TO_IMAGE
pytestmark = pytest.mark.timeout(600)


def params(**extra: Any) -> TaskParams:
    return TaskParams.model_validate(
        {"prompt": "a cat", "steps": 4, "width": 64, "height": 64, "seed": 3, "extra": {"mask": "m", **extra}}
    )


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


NOISE = Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8))
"""An input 128 wide and 96 high; ``MASK`` repaints 30 × 30 pixels of it."""
MASK = Image.new("L", (128, 96), 0)
MASK.paste(255, (50, 30, 80, 60))
FAR = np.ones((96, 128), bool)
FAR[20:70, 40:90] = False
"""Pixels well outside the blurred mask."""


def test_the_fields_are_read_with_sd_webuis_defaults_and_bad_values_refused() -> None:
    assert inpaint.read(I2I, params()) == inpaint.Inpaint(4, 4, False, 0, True, 0)
    assert inpaint.read(TaskType.TEXT_TO_IMAGE, params()) is None
    both = inpaint.read(
        I2I, params(mask_blur=9, mask_blur_x=1, inpainting_mask_invert=1, inpaint_full_res=False)
    )
    assert both == inpaint.Inpaint(9, 9, True, 0, False, 0)  # SD WebUI's mask_blur sets both
    assert inpaint.read(I2I, params(mask_round=False)) == inpaint.Inpaint(
        4, 4, False, 0, True, 0, round=False
    )
    bad_values: list[dict[str, Any]] = [
        {"mask_blur": -1},
        {"inpainting_fill": 4},
        {"inpaint_full_res_padding": "8"},
        {"mask": 3},
        {"mask_round": "yes"},
    ]
    for bad in bad_values:
        with pytest.raises(Reject) as e:
            inpaint.read(I2I, params(**bad))
        assert e.value.code == "invalid_params"
    with pytest.raises(Reject) as e:  # at the API's door, for a diffusers queue
        refuse("diffusers", I2I, params(mask_blur_x=10**6))
    assert (
        e.value.code == "invalid_params" and "mask_blur_x must be an integer from 0 to 256" in e.value.reason
    )


def test_what_the_runtime_does_not_implement_is_refused_by_name_and_only_with_a_mask() -> None:
    for extra, named in (({"latent_mask": "x"}, "latent_mask"),):
        with pytest.raises(Reject, match=named) as e:
            refuse("diffusers", I2I, params(**extra))
        assert e.value.code == "unsupported_option"
    for fill in range(4):
        refuse("diffusers", I2I, params(inpainting_fill=fill, mask_blur=0))
    refuse("diffusers", I2I, params(mask_round=False))
    with pytest.raises(Reject, match="inpainting is image-to-image's"):
        refuse("diffusers", TaskType.TEXT_TO_IMAGE, params())
    refuse("a1111", I2I, params(latent_mask="x"))  # SD WebUI does it all


def test_blur_fill_and_region_are_sd_webuis() -> None:
    blur = REAL["blur"]
    mask = Image.fromarray(np.array(blur["mask"], np.uint8))
    mine = np.asarray(I.blur(mask, blur["x"], blur["y"]))
    assert np.array_equal(mine, np.array(blur["blurred"]))  # OpenCV's integer arithmetic, byte for byte
    fill = REAL["fill"]
    image = Image.fromarray(np.array(fill["image"], np.uint8))
    filled = I.filled(image, Image.fromarray(np.array(fill["mask"], np.uint8)))
    assert np.array_equal(np.asarray(filled), np.array(fill["filled"]))
    for case in REAL["expand_crop_region"]:
        got = I.expand_region(tuple(case["box"]), tuple(case["processing"]), tuple(case["image"]))
        assert list(got) == case["expanded"], case


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    return tiny_diffusers(tmp_path_factory.mktemp("models"))


async def run(runtime: DiffusersRuntime, mask: Image.Image = MASK, **extra: Any) -> tuple[Image.Image, str]:
    p = params(**extra).model_copy(update={"denoising_strength": 0.75})
    made = await runtime.run(Job("t", I2I, None, p, init_images=[png(NOISE)], mask=png(mask)), no_progress)
    return rgb(made.images[0]), made.info["infotexts"][0].rsplit("\n", 1)[-1]


async def test_only_masked_repaints_the_region_and_pastes_it_back_into_the_input(
    runtime: DiffusersRuntime,
) -> None:
    """SD WebUI's API default ("Only masked"): the input keeps its size (128 × 96, not the task's
    64 × 64), every pixel outside the blurred mask is the input's, the masked square is new."""
    image, said = await run(runtime)
    out, source = np.asarray(image).astype(int), np.asarray(NOISE).astype(int)
    assert image.size == (128, 96)
    assert np.array_equal(out[FAR], source[FAR])
    assert np.abs(out[35:55, 55:75] - source[35:55, 55:75]).mean() > 20
    # SD WebUI 1.10.1's words and order for the same request (its server, this session's note)
    assert said.endswith(
        "Denoising strength: 0.75, Mask blur: 4, Inpaint area: Only masked, Masked area padding: 0, "
        f"Masked content: fill, Version: {VERSION}"
    )


async def test_whole_picture_inverted_and_blank_masks(runtime: DiffusersRuntime) -> None:
    whole, said = await run(runtime, inpaint_full_res=False)
    assert whole.size == (64, 64) and said.endswith(f"Mask blur: 4, Masked content: fill, Version: {VERSION}")
    inverted, said = await run(runtime, inpainting_mask_invert=1, inpainting_fill=1, mask_blur=0)
    out, source = np.asarray(inverted).astype(int), np.asarray(NOISE).astype(int)
    assert np.array_equal(out[30:60, 50:80], source[30:60, 50:80])  # the mask's square is kept
    assert said.endswith(
        "Mask mode: Inpaint not masked, Inpaint area: Only masked, Masked area padding: 0, "
        f"Version: {VERSION}"
    )
    # "Only masked" with a blank mask: SD WebUI repaints the whole input at the task's size
    blank, said = await run(runtime, mask=Image.new("L", (128, 96), 0))
    assert blank.size == (64, 64) and said.endswith(
        f"Denoising strength: 0.75, Mask blur: 4, Version: {VERSION}"
    )


async def test_latent_fills_start_the_masked_latents_from_noise_or_nothing(runtime: DiffusersRuntime) -> None:
    """``inpainting_fill`` 2 and 3 replace the input's latents inside the mask (by noise of the
    image's seed, by zeros) before sampling: other images inside, the same input outside, each
    the same again with the same seed."""
    made = {fill: await run(runtime, inpainting_fill=fill) for fill in (1, 2, 3)}
    again, _ = await run(runtime, inpainting_fill=2)
    source = np.asarray(NOISE).astype(int)
    inside = {fill: np.asarray(image).astype(int)[35:55, 55:75] for fill, (image, _) in made.items()}
    for fill, (image, said) in made.items():
        assert image.size == (128, 96) and np.array_equal(np.asarray(image).astype(int)[FAR], source[FAR])
        word = {1: "", 2: ", Masked content: latent noise", 3: ", Masked content: latent nothing"}[fill]
        assert said.endswith(f"Masked area padding: 0{word}, Version: {VERSION}"), said
    assert np.abs(inside[2] - inside[3]).mean() > 1 and np.abs(inside[1] - inside[3]).mean() > 1
    assert np.array_equal(np.asarray(again), np.asarray(made[2][0]))


async def test_mask_round_off_blends_the_blurred_edge_softly(runtime: DiffusersRuntime) -> None:
    """SD WebUI's ``mask_round: false`` (refused in the first version): the latents' mask keeps its
    grey, so the blurred edge is blended by degrees, not repainted or kept whole."""
    soft, said = await run(runtime, mask_round=False, mask_blur=12)
    rounded, same_words = await run(runtime, mask_blur=12)
    assert said == same_words  # SD WebUI writes nothing of it
    out, other = np.asarray(soft).astype(int), np.asarray(rounded).astype(int)
    far = np.ones((96, 128), bool)
    far[:, 18:112] = False  # the blur's kernel reaches 30 pixels past the square
    assert np.array_equal(out[far], np.asarray(NOISE).astype(int)[far])
    assert np.abs(out - other).mean() > 0.5
    from sdfleet.runtimes._inpaint_images import latent_mask

    grey = Image.new("L", (64, 64), 100)
    assert set(np.unique(np.asarray(latent_mask(grey)))) == {0}
    assert set(np.unique(np.asarray(latent_mask(grey, rounded=False)))) == {100}


@pytest.fixture(scope="module")
def inpainting_unet(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    """The tiny model with an inpainting UNet (9 input channels: latents, mask, masked input)."""
    root = tmp_path_factory.mktemp("models")
    runtime = tiny_diffusers(root)
    with_inpainting_unet(root / "tiny-a")
    return runtime


@pytest.mark.parametrize("fill", [0, 2])
async def test_an_inpainting_unet_is_given_the_mask_and_masked_input(
    inpainting_unet: DiffusersRuntime, fill: int
) -> None:
    image, said = await run(inpainting_unet, inpainting_fill=fill)
    assert image.size == (128, 96)
    assert np.array_equal(np.asarray(image).astype(int)[FAR], np.asarray(NOISE).astype(int)[FAR])
    # SD WebUI 1.10.1's words with an inpainting checkpoint (its server, this session's note)
    assert said.endswith(
        "Denoising strength: 0.75, Conditional mask weight: 1.0, Mask blur: 4, Inpaint area: Only masked, "
        f"Masked area padding: 0, Masked content: {inpaint.FILLS[fill]}, Version: {VERSION}"
    )


async def test_an_inpainting_checkpoint_runs_text_and_image_to_image_without_a_mask(
    inpainting_unet: DiffusersRuntime,
) -> None:
    """SD WebUI runs every task on an inpainting checkpoint: without a mask, the whole image is
    masked (text-to-image from grey at full strength). They failed as runtime failures (4 input
    channels given to a UNet of 9), retried."""
    t2i = TaskParams(prompt="a cat", steps=3, width=64, height=64, seed=4, batch_size=2)
    made = await inpainting_unet.run(Job("t", TaskType.TEXT_TO_IMAGE, None, t2i), no_progress)
    assert [rgb(png).size for png in made.images] == [(64, 64), (64, 64)]
    assert made.info["infotexts"][0].endswith(
        f"Model: tiny-a, Conditional mask weight: 1.0, Version: {VERSION}"
    )
    assert made.info["conditional_mask_weight"] == 1.0
    second = await inpainting_unet.run(
        Job("t", TaskType.TEXT_TO_IMAGE, None, t2i.model_copy(update={"seed": 5})), no_progress
    )
    pair = await inpainting_unet.run_batch(
        [
            Job("a", TaskType.TEXT_TO_IMAGE, None, t2i),
            Job("b", TaskType.TEXT_TO_IMAGE, None, t2i.model_copy(update={"seed": 5})),
        ],
        [no_progress, no_progress],
    )
    assert all(isinstance(r, RuntimeResult) and r.info["batch_tasks"] == 2 for r in pair)
    for alone, batched in ((made, pair[0]), (second, pair[1])):
        assert isinstance(batched, RuntimeResult)
        diff = np.abs(
            np.asarray(rgb(alone.images[0])).astype(int) - np.asarray(rgb(batched.images[0])).astype(int)
        )
        assert diff.max() <= 1  # the same image as alone, up to float rounding
    i2i = TaskParams(prompt="a cat", steps=3, width=64, height=64, seed=4, denoising_strength=0.75)
    made = await inpainting_unet.run(Job("t", I2I, None, i2i, init_images=[png(NOISE)]), no_progress)
    assert rgb(made.images[0]).size == (64, 64)
    assert made.info["infotexts"][0].endswith(
        f"Denoising strength: 0.75, Conditional mask weight: 1.0, Version: {VERSION}"
    )


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
async def test_an_inpainting_checkpoint_runs_the_hires_fix(
    inpainting_unet: DiffusersRuntime, upscaler: str
) -> None:
    """It was refused (``unsupported_option``). SD WebUI gives the second pass the whole image
    masked, as every unmasked task there; from a latent upscaler's latents the grey masked input
    is encoded, not zeros. Batch-mates get the images they get alone."""
    extra = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": upscaler, "hr_second_pass_steps": 2}
    base = TaskParams(
        prompt="a cat", steps=2, width=64, height=64, seed=4, denoising_strength=0.6, extra=extra
    )
    alone = [
        await inpainting_unet.run(
            Job(n, TaskType.TEXT_TO_IMAGE, None, base.model_copy(update={"seed": s})), no_progress
        )
        for n, s in (("a", 4), ("b", 5))
    ]
    said = alone[0].info["infotexts"][0]
    assert rgb(alone[0].images[0]).size == (96, 96)
    assert ", Conditional mask weight: 1.0, " in said and f"Hires upscaler: {upscaler}" in said, said
    pair = await inpainting_unet.run_batch(
        [
            Job(n, TaskType.TEXT_TO_IMAGE, None, base.model_copy(update={"seed": s}))
            for n, s in (("a", 4), ("b", 5))
        ],
        [no_progress, no_progress],
    )
    for one, batched in zip(alone, pair, strict=True):
        assert isinstance(batched, RuntimeResult) and batched.info["batch_tasks"] == 2
        diff = np.abs(
            np.asarray(rgb(one.images[0])).astype(int) - np.asarray(rgb(batched.images[0])).astype(int)
        )
        assert diff.max() <= 1
    assert (
        np.abs(
            np.asarray(rgb(alone[0].images[0])).astype(int) - np.asarray(rgb(alone[1].images[0])).astype(int)
        ).mean()
        > 1
    )


def test_the_grey_masked_input_of_a_latent_second_pass_is_encoded(inpainting_unet: DiffusersRuntime) -> None:
    """diffusers takes zeros for the masked input's latents when it is given latents; SD WebUI
    encodes a grey image (``txt2img_image_conditioning``): the VAE's latents of grey."""
    import torch

    from sdfleet.runtimes import _diffusers_inpaint as F
    from sdfleet.runtimes import _diffusers_pipes as P

    pipe = P.img2img_from(P.load_pipeline(inpainting_unet.catalog.resolve("tiny-a"), "cpu", torch.float32))
    import inspect

    assert P.inpainting_unet(pipe) and "masked_image_latents" in inspect.signature(pipe.__call__).parameters
    with torch.inference_mode():  # as the runtime calls it
        args = F.whole_masked(pipe, (48, 32), [1, 2], latents=True)
        latents = args["masked_image_latents"]
        assert latents.shape == (2, 4, 4, 6) and latents.abs().mean() > 0.01
        grey = pipe.vae.encode(torch.zeros(1, 3, 32, 48)).latent_dist.mean * pipe.vae.config.scaling_factor
    assert torch.allclose(latents.mean(dim=0, keepdim=True), grey, atol=3 * float(latents.std()))
    assert [m.size for m in args["mask_image"]] == [(48, 32)] * 2 and (args["width"], args["height"]) == (
        48,
        32,
    )
    assert "masked_image_latents" not in F.whole_masked(pipe, (48, 32), [1], latents=False)


async def test_an_unreadable_or_missing_mask_is_refused(runtime: DiffusersRuntime) -> None:
    p = params().model_copy(update={"denoising_strength": 0.75})
    with pytest.raises(Reject, match="mask is not a readable image") as e:
        await runtime.run(Job("t", I2I, None, p, init_images=[png(NOISE)], mask=b"not an image"), no_progress)
    assert e.value.code == "invalid_image"
    with pytest.raises(Reject, match="which was not fetched"):
        await runtime.run(Job("t", I2I, None, p, init_images=[png(NOISE)]), no_progress)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = a1111_server(tmp_path_factory.mktemp("models"), free_port(), default_model=None)
    yield srv
    srv.stop()


def test_runtime_serve_inpaints_for_webuiapi_as_sd_webui_does(server: ServerThread) -> None:
    """The third-party client's ``mask_image`` with its defaults (blur 4, fill, "Only masked")."""
    api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler", steps=3)
    out = api.img2img(images=[NOISE], mask_image=MASK, prompt="a cat", seed=5, width=64, height=64)
    assert out.image.size == (128, 96)
    assert np.array_equal(np.asarray(out.image.convert("RGB"))[FAR], np.asarray(NOISE)[FAR])
    said = out.info["infotexts"][0]
    assert (
        "Mask blur: 4, Inpaint area: Only masked, Masked area padding: 0, Masked content: fill, Version:"
        in said
    )
    assert out.info["extra_generation_params"]["Inpaint area"] == "Only masked"
    body = {"init_images": [webuiapi.raw_b64_img(NOISE)], "mask": webuiapi.raw_b64_img(MASK), "prompt": "x"}
    with httpx.Client(base_url=server.url, timeout=300) as http:
        latent = http.post("/sdapi/v1/img2img", json={**body, "latent_mask": "x", "steps": 1})
        unreadable = http.post("/sdapi/v1/img2img", json={**body, "mask": "bm90IGFuIGltYWdl", "steps": 1})
    assert latent.status_code == 422 and "latent_mask is not available" in latent.text, latent.text
    assert (
        unreadable.status_code == 400 and unreadable.json()["detail"] == "Invalid encoded image"
    )  # SD WebUI's


def test_the_a1111_runtime_sends_the_mask_the_agent_fetched() -> None:
    """The agent fetches a task's mask with its inputs (a URL, ``s3://`` or base64); SD WebUI gets
    its base64, not the URL again (SD WebUI fetches no URL, and s3:// was never inlined)."""
    from sdfleet.runtimes._a1111_payload import b64, build_body

    p = params(mask="s3://bucket/mask.png", mask_blur=2)
    body = build_body(Job("t", I2I, None, p, init_images=[png(NOISE)], mask=png(MASK)))
    assert (
        body["mask"] == b64(png(MASK)) and body["mask_blur"] == 2 and body["init_images"] == [b64(png(NOISE))]
    )


async def test_the_mask_work_is_done_while_another_job_holds_the_device(
    runtime: DiffusersRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blurring a large mask far takes seconds (4096² at blur 256: about 18 s here): done under
    the device's lock, the GPU would wait for it. A masked job's image work runs before its turn."""
    from sdfleet.runtimes import _diffusers_inpaint as F

    events: list[str] = []
    prepare = F.prepare

    def recorded(job: Job) -> F.Inpainting | None:
        ready = prepare(job)
        events.append(f"{job.task_id} ready")
        return ready

    monkeypatch.setattr(F, "prepare", recorded)
    long = params().model_copy(update={"steps": 40, "extra": {}})

    async def run_long() -> None:
        await runtime.run(Job("long", TaskType.TEXT_TO_IMAGE, None, long), no_progress)
        events.append("long done")

    first = asyncio.create_task(run_long())
    while not runtime._lock.locked():  # the long job holds the device
        await asyncio.sleep(0.001)
    masked = params().model_copy(update={"denoising_strength": 0.75})
    await runtime.run(Job("masked", I2I, None, masked, init_images=[png(NOISE)], mask=png(MASK)), no_progress)
    await first
    assert events.index("masked ready") < events.index("long done"), events


def test_runtime_serve_says_an_inpainting_checkpoints_conditional_mask_weight(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``runtime serve`` with an inpainting checkpoint, as the real SD WebUI answered with one (a
    random SD 1.5 inpainting-shaped file, this session's note): ``Conditional mask weight: 1.0``
    after the denoising strength, ``is_using_inpainting_conditioning`` true."""
    from sdfleet.models import ModelCatalog, make_tiny
    from sdfleet.runtime_server import create_app

    root = tmp_path_factory.mktemp("models")
    with_inpainting_unet(make_tiny(root, "tiny-a", seed=0))
    catalog = ModelCatalog(root)
    app = create_app(DiffusersRuntime(catalog, default_model="tiny-a", device="cpu"), catalog)
    srv = ServerThread(app, free_port()).start()
    try:
        api = webuiapi.WebUIApi(baseurl=f"{srv.url}/sdapi/v1", sampler="Euler", steps=2)
        t2i = api.txt2img(prompt="a cat", seed=1, width=64, height=64)
        i2i = api.img2img(images=[NOISE], prompt="a cat", seed=1, width=64, height=64, denoising_strength=0.5)
    finally:
        srv.stop()
    assert t2i.info["is_using_inpainting_conditioning"] is True
    assert ", Conditional mask weight: 1.0, Version:" in t2i.info["infotexts"][0]
    assert ", Denoising strength: 0.5, Conditional mask weight: 1.0, Version:" in i2i.info["infotexts"][0]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    from sdfleet.models import ModelCatalog, make_tiny

    root = tmp_path_factory.mktemp("models")
    make_tiny(root, "tiny-xl", seed=0, sdxl=True)
    return DiffusersRuntime(ModelCatalog(root), default_model="tiny-xl", device="cpu")


@pytest.mark.parametrize("fill", [0, 2])
async def test_sdxl_inpaints_on_its_own_pipeline(sdxl: DiffusersRuntime, fill: int) -> None:
    """SDXL's inpainting pipeline (its own class, other arguments) with an image and with latents."""
    image, said = await run(sdxl, inpainting_fill=fill)
    assert image.size == (128, 96)
    assert np.array_equal(np.asarray(image).astype(int)[FAR], np.asarray(NOISE).astype(int)[FAR])
    assert said.endswith(f"Masked area padding: 0, Masked content: {inpaint.FILLS[fill]}, Version: {VERSION}")


def test_latent_fills_blend_by_a_soft_mask_as_sd_webui_does() -> None:
    """SD WebUI fills the latents by its ``nmask``: with ``mask_round`` off a grey latent pixel is
    part input, part noise (or nothing). The fill thresholded it at half."""
    import torch

    from sdfleet.runtimes._diffusers_inpaint import latent_start

    class Pipe:  # what latent_start asks of a pipeline: latents of 1 everywhere, a plain UNet
        vae_scale_factor = 8
        device = "cpu"
        vae = type("Vae", (), {"dtype": torch.float32})()
        unet = type("Unet", (), {"config": type("Config", (), {"in_channels": 4})()})()
        image_processor = type(
            "P", (), {"preprocess": staticmethod(lambda images, **_: torch.zeros(1, 3, 16, 16))}
        )()

        @staticmethod
        def _encode_vae_image(pixels: torch.Tensor, generator: Any) -> torch.Tensor:
            return torch.ones(1, 4, 2, 2)

    grey = Image.new("L", (16, 16), 64)  # a quarter repainted
    canvas = I.Canvas(Image.new("RGB", (16, 16)), grey, None, None)
    nothing = latent_start(Pipe(), [canvas], 3, [1], (16, 16))["image"]
    assert torch.allclose(nothing, torch.full((1, 4, 2, 2), 1 - 64 / 255))


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
async def test_an_sdxl_inpainting_checkpoint_runs_the_hires_fix(
    tmp_path_factory: pytest.TempPathFactory, upscaler: str
) -> None:
    """SDXL's inpainting pipeline (its own class) takes the same whole-image mask and grey input."""
    from sdfleet.models import ModelCatalog, make_tiny

    root = tmp_path_factory.mktemp("models")
    with_inpainting_unet(make_tiny(root, "tiny-xl", seed=0, sdxl=True))
    runtime = DiffusersRuntime(ModelCatalog(root), default_model="tiny-xl", device="cpu")
    extra = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": upscaler, "hr_second_pass_steps": 2}
    p = TaskParams(prompt="a cat", steps=2, width=64, height=64, seed=1, denoising_strength=0.6, extra=extra)
    made = await runtime.run(Job("t", TaskType.TEXT_TO_IMAGE, None, p), no_progress)
    assert rgb(made.images[0]).size == (96, 96)
    assert ", Conditional mask weight: 1.0, " in made.info["infotexts"][0]
