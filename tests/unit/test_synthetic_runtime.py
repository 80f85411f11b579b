"""The synthetic runtime: real PNGs, deterministic, interruptible, model switches without torch."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from PIL import Image

from sdfleet.errors import Interrupted, Reject
from sdfleet.models import ModelCatalog
from sdfleet.runtimes import build_runtime
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.synthetic import SyntheticRuntime
from sdfleet.tasks import TaskParams, TaskType


def job(kind: TaskType = TaskType.TEXT_TO_IMAGE, model: str | None = None, **params: object) -> Job:
    base: dict[str, object] = {"prompt": "a red cat", "width": 96, "height": 64, "seed": 3}
    base.update(params)
    init = base.pop("init_images", [])
    assert isinstance(init, list)
    return Job("t-1", kind, model, TaskParams.model_validate(base), init_images=init)


async def no_progress(value: float) -> None:
    return None


def size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


async def test_images_of_asked_size_and_batch() -> None:
    rt = SyntheticRuntime(latency_s=0.01)
    result = await rt.run(job(batch_size=3), no_progress)
    assert [size(png) for png in result.images] == [(96, 64)] * 3
    assert result.seed == 3 and result.info["all_seeds"] == [3, 4, 5]
    assert len(set(result.images)) == 3


async def test_deterministic_from_seed_and_prompt() -> None:
    rt = SyntheticRuntime(latency_s=0)
    a = await rt.run(job(seed=7), no_progress)
    b = await rt.run(job(seed=7), no_progress)
    c = await rt.run(job(seed=8), no_progress)
    d = await rt.run(job(seed=7, prompt="a blue dog"), no_progress)
    assert a.images == b.images
    assert a.images != c.images and a.images != d.images
    random_seed = await rt.run(job(seed=-1), no_progress)
    assert random_seed.seed is not None and random_seed.seed >= 0


async def test_latency_and_progress() -> None:
    rt = SyntheticRuntime(latency_s=0.2, progress_steps=4)
    seen: list[float] = []

    async def progress(value: float) -> None:
        seen.append(value)

    started = time.monotonic()
    await rt.run(job(), progress)
    assert time.monotonic() - started >= 0.19
    assert seen == [0.25, 0.5, 0.75, 1.0]


async def test_interrupt_then_still_works() -> None:
    rt = SyntheticRuntime(latency_s=5, progress_steps=50)

    async def progress(value: float) -> None:
        if value >= 0.04:
            await rt.interrupt()

    started = time.monotonic()
    with pytest.raises(Interrupted):
        await rt.run(job(), progress)
    assert time.monotonic() - started < 1
    rt.latency_s = 0.01
    assert len((await rt.run(job(), no_progress)).images) == 1


async def test_model_switch_tracks_job_model() -> None:
    rt = SyntheticRuntime(latency_s=0, switch_latency_s=0.05, default_model="a")
    await rt.start()
    assert rt.loaded_model == "a" and rt.switches == 1
    await rt.run(job(model=None), no_progress)
    assert rt.loaded_model == "a" and rt.switches == 1
    started = time.monotonic()
    result = await rt.run(job(model="b"), no_progress)
    assert time.monotonic() - started >= 0.05
    assert rt.loaded_model == "b" and result.model == "b" and rt.switches == 2


async def test_extras_scale_the_input() -> None:
    rt = SyntheticRuntime(latency_s=0)
    src = (await rt.run(job(), no_progress)).images[0]
    single = await rt.run(
        job(TaskType.EXTRA_SINGLE_IMAGE, upscaling_resize=2, init_images=[src, src]), no_progress
    )
    batch = await rt.run(
        job(TaskType.EXTRA_BATCH_IMAGES, upscaling_resize=0.5, init_images=[src, src]), no_progress
    )
    assert [size(p) for p in single.images] == [(192, 128)]
    assert [size(p) for p in batch.images] == [(48, 32), (48, 32)]


async def test_build_with_catalog_rejects_unknown_model(tmp_path: Path) -> None:
    (tmp_path / "known.safetensors").write_bytes(b"x")
    catalog = ModelCatalog(tmp_path)
    rt = build_runtime("synthetic", catalog=catalog, options={"latency_s": 0, "use_catalog": True})
    assert isinstance(rt, SyntheticRuntime) and rt.latency_s == 0
    result = await rt.run(job(model="known"), no_progress)
    assert result.model == "known.safetensors"
    with pytest.raises(Reject):
        await rt.run(job(model="unknown"), no_progress)
    with pytest.raises(Reject):
        await rt.run(job(TaskType.PIPELINE), no_progress)
