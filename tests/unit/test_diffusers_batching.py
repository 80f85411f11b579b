"""Dynamic batching in the diffusers runtime on a tiny random-weight model (CPU, 64x64, 2 steps).

Batch-mates share one pipeline call but keep their own prompt, negative prompt and seeds: their
images are those they get alone. A task that is invalid or interrupted fails alone.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdfleet.errors import Interrupted, Reject
from sdfleet.models import ModelCatalog, make_tiny
from sdfleet.runtimes._diffusers_sde import BrownianNoise
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> ModelCatalog:
    root = tmp_path_factory.mktemp("models")
    make_tiny(root, "tiny-a", seed=0)
    return ModelCatalog(root)


@pytest.fixture(scope="module")
def runtime(catalog: ModelCatalog) -> DiffusersRuntime:
    options = {"device": "cpu", "max_batch": 4, "max_batch_wait_ms": 20}
    return DiffusersRuntime.from_options(catalog=catalog, options=options, default_model="tiny-a")


def job(task_id: str, kind: TaskType = TaskType.TEXT_TO_IMAGE, **params: object) -> Job:
    base: dict[str, object] = {"prompt": "a red cat", "steps": 2, "width": 64, "height": 64, "seed": 1}
    base.update(params)
    init = base.pop("init_images", [])
    assert isinstance(init, list)
    return Job(task_id, kind, "tiny-a", TaskParams.model_validate(base), init_images=init)


async def quiet(value: float) -> None:
    return None


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def assert_same_images(batched: RuntimeResult, alone: RuntimeResult) -> None:
    assert len(batched.images) == len(alone.images)
    for b, a in zip(batched.images, alone.images, strict=True):
        # Same seeds, same latents; a batched matmul may round its last bit differently.
        assert np.abs(pixels(b) - pixels(a)).max() <= 1


def png_of(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return buf.getvalue()


def test_options_and_keys(runtime: DiffusersRuntime) -> None:
    assert runtime.max_batch == 4 and runtime.batch_wait_s == pytest.approx(0.02)
    base = runtime.batch_key(job("a"))
    assert base is not None
    assert runtime.batch_key(job("b", prompt="a dog", seed=7, batch_size=2)) == base
    for other in ({"steps": 3}, {"width": 128}, {"sampler": "DDIM"}, {"cfg_scale": 3.0}, {"clip_skip": 2}):
        assert runtime.batch_key(job("c", **other)) != base, other
    assert runtime.batch_key(job("d", sampler="no such sampler")) is None
    assert runtime.batch_key(job("e", kind=TaskType.EXTRA_SINGLE_IMAGE)) is None
    with pytest.raises(ValueError, match="max_batch"):
        DiffusersRuntime.from_options(catalog=runtime.catalog, options={"max_batch": 0})


async def test_batch_mates_get_their_own_images(runtime: DiffusersRuntime) -> None:
    jobs = [
        job("a", prompt="a red cat", seed=11),
        job("b", prompt="a blue dog", seed=22, negative_prompt="blurry"),
        job("c", prompt="a green bird", seed=33, batch_size=2),
    ]
    # mixed negative prompts split a batch (see the key): run the two kinds as two batches
    plain = [jobs[0], jobs[2]]
    batched = await runtime.run_batch(plain, [quiet, quiet])
    for j, outcome in zip(plain, batched, strict=True):
        assert isinstance(outcome, RuntimeResult)
        alone = await runtime.run(j, quiet)
        assert_same_images(outcome, alone)
        assert outcome.seed == j.params.seed and outcome.info["all_seeds"] == alone.info["all_seeds"]
        assert outcome.info["prompt"] == j.params.prompt
    different = await runtime.run_batch(plain[:1], [quiet])
    assert isinstance(different[0], RuntimeResult)
    assert not np.array_equal(pixels(batched[0].images[0]), pixels(batched[1].images[0]))  # type: ignore[union-attr]


@pytest.mark.parametrize("sampler", ["DPM++ 2M SDE Karras", "DPM++ SDE Karras"])
async def test_sde_batch_mates_get_the_noise_they_get_alone(
    runtime: DiffusersRuntime, monkeypatch: pytest.MonkeyPatch, sampler: str
) -> None:
    """The SDE samplers draw each image's noise from a Brownian tree of its own seed (SD WebUI's),
    so batch mates (and a task's second image) get the images they get alone, and another seed
    another image."""
    trees: list[list[int]] = []
    made = BrownianNoise.__init__

    def seen(self: BrownianNoise, like: Any, low: Any, high: Any, seeds: Any) -> None:
        trees.append(list(seeds))
        made(self, like, low, high, seeds)

    monkeypatch.setattr(BrownianNoise, "__init__", seen)
    jobs = [job(n, sampler=sampler, steps=4, seed=seed) for n, seed in (("a", 11), ("b", 12))]
    jobs.append(job("c", sampler=sampler, steps=4, seed=13, batch_size=2))
    batched = await runtime.run_batch(jobs, [quiet] * len(jobs))
    for j, outcome in zip(jobs, batched, strict=True):
        assert isinstance(outcome, RuntimeResult) and outcome.info["batch_tasks"] == 3
        assert_same_images(outcome, await runtime.run(j, quiet))
    first, second = (pixels(outcome.images[0]) for outcome in batched[:2])  # type: ignore[union-attr]
    assert not np.array_equal(first, second)
    assert trees[0] == [11, 12, 13, 14] and trees[1:] == [[11], [12], [13, 14]]  # one tree an image


async def test_img2img_batch_keeps_each_init_image(runtime: DiffusersRuntime) -> None:
    kind = TaskType.IMAGE_TO_IMAGE
    jobs = [
        job("r", kind, init_images=[png_of((255, 0, 0))], denoising_strength=0.5),
        job("g", kind, init_images=[png_of((0, 255, 0))], denoising_strength=0.5),
    ]
    assert runtime.batch_key(jobs[0]) == runtime.batch_key(jobs[1])
    batched = await runtime.run_batch(jobs, [quiet, quiet])
    for j, outcome in zip(jobs, batched, strict=True):
        assert isinstance(outcome, RuntimeResult)
        assert_same_images(outcome, await runtime.run(j, quiet))


async def test_invalid_batch_mate_fails_alone(runtime: DiffusersRuntime) -> None:
    jobs = [job("ok", seed=5), job("bad", TaskType.IMAGE_TO_IMAGE), job("ok2", seed=6)]
    outcomes = await runtime.run_batch(jobs, [quiet, quiet, quiet])
    assert isinstance(outcomes[0], RuntimeResult) and isinstance(outcomes[2], RuntimeResult)
    assert isinstance(outcomes[1], Reject) and "init image" in outcomes[1].reason


async def test_interrupted_batch_mate_fails_alone_and_all_stop_when_all_are(
    runtime: DiffusersRuntime,
) -> None:
    started = asyncio.Event()

    async def progress(value: float) -> None:
        started.set()

    jobs = [job("keep", steps=12), job("drop", steps=12)]
    running = asyncio.create_task(runtime.run_batch(jobs, [progress, progress]))
    await started.wait()
    await runtime.interrupt("drop")
    keep, drop = await running
    assert isinstance(keep, RuntimeResult) and len(keep.images) == 1
    assert isinstance(drop, Interrupted)

    started.clear()
    running = asyncio.create_task(runtime.run_batch(jobs, [progress, progress]))
    await started.wait()
    await runtime.interrupt("keep")
    await runtime.interrupt("drop")
    outcomes = await running
    assert all(isinstance(o, Interrupted) for o in outcomes), outcomes


async def test_progress_reaches_every_batch_mate(runtime: DiffusersRuntime) -> None:
    seen: dict[str, list[float]] = {"a": [], "b": []}

    def reporter(name: str):  # type: ignore[no-untyped-def]
        async def report(value: float) -> None:
            seen[name].append(value)

        return report

    await runtime.run_batch([job("a", steps=4), job("b", steps=4)], [reporter("a"), reporter("b")])
    assert seen["a"] == seen["b"] and seen["a"][-1] == 1.0 and len(seen["a"]) >= 2
