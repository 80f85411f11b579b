"""Masked tasks share a pipeline call (dynamic batching) in the diffusers runtime: each keeps its
own input, mask, region, seed and prompt, and gets the images it gets alone. They ran alone
before, so a burst of inpainting tasks used the GPU one image at a time."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fakes.tiny import no_progress, with_inpainting_unet
from sdfleet.errors import Reject
from sdfleet.models import ModelCatalog, make_tiny
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType

I2I = TaskType.IMAGE_TO_IMAGE
pytestmark = pytest.mark.timeout(600)


def batching(root: Path, inpainting_unet: bool = False, sdxl: bool = False) -> DiffusersRuntime:
    folder = make_tiny(root, "tiny-a", seed=0, sdxl=sdxl)
    if inpainting_unet:
        with_inpainting_unet(folder)
    options = {"device": "cpu", "max_batch": 4, "max_batch_wait_ms": 20}
    return DiffusersRuntime.from_options(catalog=ModelCatalog(root), options=options, default_model="tiny-a")


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    return batching(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def inpainting_unet(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    return batching(tmp_path_factory.mktemp("models"), inpainting_unet=True)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def noise(seed: int, size: tuple[int, int] = (128, 96)) -> bytes:
    rng = np.random.default_rng(seed)
    return png(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)))


def square(box: tuple[int, int, int, int], size: tuple[int, int] = (128, 96)) -> bytes:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return png(mask)


def masked(task_id: str, seed: int, box: tuple[int, int, int, int], **extra: Any) -> Job:
    p = TaskParams.model_validate(
        {
            "prompt": f"a cat {task_id}",
            "steps": 3,
            "width": 64,
            "height": 64,
            "seed": seed,
            "denoising_strength": 0.75,
            "extra": {"mask": "m", **extra},
        }
    )
    return Job(task_id, I2I, "tiny-a", p, init_images=[noise(seed)], mask=square(box))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The tasks of each pipeline call made."""
    from sdfleet.runtimes import _diffusers_generate as G

    made: list[list[str]] = []
    real = G.call_kwargs

    def recorded(pipe: Any, jobs: Any, *args: Any) -> Any:
        made.append([job.task_id for job in jobs])
        return real(pipe, jobs, *args)

    monkeypatch.setattr(G, "call_kwargs", recorded)
    return made


async def assert_as_alone(runtime: DiffusersRuntime, jobs: list[Job]) -> list[RuntimeResult]:
    together = await runtime.run_batch(jobs, [no_progress] * len(jobs))
    out = []
    for job, made in zip(jobs, together, strict=True):
        assert isinstance(made, RuntimeResult), made
        assert made.info["batch_tasks"] == len(jobs)
        alone = await runtime.run(job, no_progress)
        assert made.info["infotexts"] == alone.info["infotexts"]
        assert len(made.images) == len(alone.images)
        for b, a in zip(made.images, alone.images, strict=True):
            assert pixels(b).shape == pixels(a).shape
            assert np.abs(pixels(b) - pixels(a)).max() <= 1  # a batched matmul may round its last bit
        out.append(made)
    return out


def test_masked_tasks_share_a_key_with_those_masked_alike(runtime: DiffusersRuntime) -> None:
    box = (50, 30, 80, 60)
    key = runtime.batch_key(masked("a", 1, box))
    assert key is not None
    # their own input, mask, region, blur, padding and seed are image work: the same call
    alike = [
        masked("b", 2, (0, 0, 20, 20), mask_blur=8, inpaint_full_res_padding=32),
        masked("c", 3, box, inpaint_full_res=False, inpainting_fill=1, inpainting_mask_invert=1),
    ]
    assert [runtime.batch_key(job) for job in alike] == [key, key]
    plain = masked("d", 4, box)
    plain.params.extra.clear()
    others = [plain, masked("e", 5, box, inpainting_fill=2), masked("f", 6, box, mask_round=False)]
    keys = [runtime.batch_key(job) for job in others]
    assert None not in keys and len({key, *keys}) == 4
    assert runtime.batch_key(masked("g", 7, box, inpainting_fill=3)) not in (key, *keys)
    assert runtime.batch_key(masked("h", 8, box, mask_blur=-1)) is None  # refused alone, with its reason


async def test_masked_batch_mates_get_the_images_they_get_alone(
    runtime: DiffusersRuntime, calls: list[list[str]]
) -> None:
    """Each with its own region ("Only masked" crops another box of each input, brought to the
    task's size and pasted back into its own input) or the whole picture, fill or original."""
    jobs = [
        masked("a", 1, (50, 30, 80, 60)),
        masked("b", 2, (0, 0, 30, 20), inpainting_fill=1, mask_blur=8),
        masked("c", 3, (10, 40, 120, 90), inpaint_full_res=False, inpainting_mask_invert=1),
    ]
    jobs[2].params.batch_size = 2
    made = await assert_as_alone(runtime, jobs)
    assert calls == [["a", "b", "c"], ["a"], ["b"], ["c"]]  # one call, then each alone
    assert [pixels(m.images[0]).shape[:2] for m in made] == [(96, 128), (96, 128), (64, 64)]
    outside = np.ones((96, 128), bool)
    outside[10:80, 30:100] = False  # well outside a's blurred square: a's input itself
    assert np.array_equal(pixels(made[0].images[0])[outside], pixels(noise(1))[outside])


async def test_latent_fills_batched_and_a_blank_mask_beside_them(
    runtime: DiffusersRuntime, calls: list[list[str]]
) -> None:
    """A latent fill's call starts from latents, each image's own; a blank mask with the same
    fill is plain image-to-image from pixels: it shares the task's batch in a call of its own."""
    for fill in (2, 3):
        jobs = [
            masked("a", 1, (50, 30, 80, 60), inpainting_fill=fill),
            masked("b", 2, (5, 5, 40, 40), inpainting_fill=fill),
        ]
        blank = masked("c", 3, (0, 0, 0, 0), inpainting_fill=fill)
        assert runtime.batch_key(blank) == runtime.batch_key(jobs[0])
        calls.clear()
        await assert_as_alone(runtime, [*jobs, blank])
        assert calls[:2] == [["a", "b"], ["c"]]


async def test_mask_rounding_off_batched(runtime: DiffusersRuntime) -> None:
    jobs = [masked(n, s, (40, 20, 90, 70), mask_round=False, mask_blur=12) for n, s in (("a", 1), ("b", 2))]
    await assert_as_alone(runtime, jobs)


async def test_an_inpainting_unet_batches_masked_tasks(
    inpainting_unet: DiffusersRuntime, calls: list[list[str]]
) -> None:
    """It reads each image's own mask and masked input's latents as well."""
    for fill in (0, 2):
        jobs = [
            masked("a", 1, (50, 30, 80, 60), inpainting_fill=fill),
            masked("b", 2, (0, 50, 60, 96), inpainting_fill=fill),
        ]
        calls.clear()
        await assert_as_alone(inpainting_unet, jobs)
        assert calls[0] == ["a", "b"]


async def test_a_batch_mate_with_an_unreadable_mask_fails_alone(runtime: DiffusersRuntime) -> None:
    good = masked("good", 1, (50, 30, 80, 60))
    bad = masked("bad", 2, (50, 30, 80, 60))
    bad.mask = b"not an image"
    assert runtime.batch_key(good) == runtime.batch_key(bad)
    outcomes = await runtime.run_batch([good, bad], [no_progress, no_progress])
    assert isinstance(outcomes[0], RuntimeResult)
    assert isinstance(outcomes[1], Reject) and outcomes[1].code == "invalid_image"
    alone = await runtime.run(good, no_progress)
    assert np.abs(pixels(outcomes[0].images[0]) - pixels(alone.images[0])).max() <= 1


@pytest.mark.parametrize("fill", [0, 2])
async def test_sdxl_batches_masked_tasks(
    tmp_path_factory: pytest.TempPathFactory, calls: list[list[str]], fill: int
) -> None:
    """SDXL's inpainting pipeline (its own class) with images and with latents."""
    sdxl = batching(tmp_path_factory.mktemp("models"), sdxl=True)
    jobs = [
        masked("a", 1, (50, 30, 80, 60), inpainting_fill=fill),
        masked("b", 2, (5, 5, 60, 40), inpainting_fill=fill),
    ]
    await assert_as_alone(sdxl, jobs)
    assert calls[0] == ["a", "b"]
