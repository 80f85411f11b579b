"""Diffusers runtime options (parsed, applied on CPU) and out-of-memory handling."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from sdfleet.errors import ConfigError, Reject, RuntimeFailure
from sdfleet.models import ModelCatalog, make_tiny
from sdfleet.runtimes import build_runtime
from sdfleet.runtimes._diffusers_opts import DiffusersOptions, check_present, is_out_of_memory
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> ModelCatalog:
    root: Path = tmp_path_factory.mktemp("models")
    make_tiny(root, "tiny-a", seed=0)
    make_tiny(root, "tiny-b", seed=1)
    return ModelCatalog(root)


def job(kind: TaskType = TaskType.TEXT_TO_IMAGE, model: str = "tiny-a", **params: object) -> Job:
    base: dict[str, object] = {"prompt": "a red cat", "steps": 2, "width": 64, "height": 64, "seed": 1}
    base.update(params)
    init = base.pop("init_images", [])
    assert isinstance(init, list)
    return Job("t-oom", kind, model, TaskParams.model_validate(base), init_images=init)


async def no_progress(value: float) -> None:
    return None


def test_defaults_and_device_resolution() -> None:
    opts = DiffusersOptions.parse({})
    assert opts == DiffusersOptions()
    assert (opts.attention, opts.compile, opts.vae_tiling, opts.channels_last) == ("sdpa", False, False, None)
    assert DiffusersOptions(device="cpu").resolve_device() == ("cpu", torch.float32)
    assert DiffusersOptions(device="cpu", dtype="bf16").resolve_device() == ("cpu", torch.bfloat16)
    assert DiffusersOptions(device="cuda:1").resolve_device() == ("cuda:1", torch.float16)
    assert DiffusersOptions(device="cuda", dtype="fp32").resolve_device() == ("cuda", torch.float32)
    for device in ("tpu", "cuda:x", "CPU", "cuda:"):
        with pytest.raises(ValueError, match="use cpu, cuda, cuda:N or auto"):
            DiffusersOptions(device=device).resolve_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_refused_at_start() -> None:
    check_present("cpu")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="has no CUDA device"):
            check_present(device)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"dtype": "fp8"}, "dtype must be one of"),
        ({"attention": "xformers"}, "attention must be one of"),
        ({"compile": "yes"}, "compile must be true or false"),
        ({"channel_last": True}, "unknown diffusers option"),
        ({"generate_max_pixels": 63}, "generate_max_pixels must be an integer of at least 64"),
        ({"generate_max_pixels": 1.5e6}, "generate_max_pixels must be an integer"),
    ],
)
def test_bad_options_are_config_errors(catalog: ModelCatalog, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_runtime("diffusers", catalog=catalog, options=options)


async def test_options_applied_on_cpu(catalog: ModelCatalog, caplog: pytest.LogCaptureFixture) -> None:
    options = {
        "device": "cpu",
        "attention": "classic",
        "channels_last": True,
        "compile": True,
        "vae_tiling": True,
    }
    rt = build_runtime("diffusers", catalog=catalog, options=options, default_model="tiny-a")
    assert isinstance(rt, DiffusersRuntime)
    with caplog.at_level(logging.INFO, logger="sdfleet.runtimes._diffusers_opts"):
        await rt.start()
    unet = rt._cache["tiny-a"].pipe.unet
    assert type(unet).__name__ == "UNet2DConditionModel"  # not compiled on CPU ...
    assert "compile option skipped" in caplog.text  # ... and the log says so
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not unet.conv_in.weight.is_contiguous()
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    assert rt._cache["tiny-a"].pipe.vae.use_tiling
    assert len((await rt.run(job(), no_progress)).images) == 1
    await rt.aclose()


async def test_default_options_on_cpu() -> None:
    root = ModelCatalog(Path("/nonexistent"))
    rt = DiffusersRuntime(root, device="cpu")
    assert (rt.device, rt.dtype, rt.options.attention) == ("cpu", torch.float32, "sdpa")


async def test_sdpa_and_bf16_on_cpu(catalog: ModelCatalog) -> None:
    opts = DiffusersOptions(device="cpu", dtype="bf16")
    rt = DiffusersRuntime(catalog, default_model="tiny-a", options=opts)
    result = await rt.run(job(), no_progress)
    unet = rt._cache["tiny-a"].pipe.unet
    assert unet.dtype == torch.bfloat16 and len(result.images) == 1
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert unet.conv_in.weight.is_contiguous()  # channels_last defaults to off on CPU
    await rt.aclose()


async def test_a_generation_over_the_size_bound_fails_before_it_runs(catalog: ModelCatalog) -> None:
    """A message published past the API is not held to ``api.max_width``/``max_height``; the runtime
    refuses what is bigger than ``generate_max_pixels`` (``too_large``, a ``Reject``: not retried)
    before it loads a model, and in a batch only that task fails."""
    options = {"device": "cpu", "generate_max_pixels": 64 * 96}
    runtime = build_runtime("diffusers", catalog=catalog, options=options)
    assert isinstance(runtime, DiffusersRuntime)
    try:
        for kind in (TaskType.TEXT_TO_IMAGE, TaskType.IMAGE_TO_IMAGE):
            with pytest.raises(Reject) as caught:
                await runtime.run(job(kind, width=96, height=72, init_images=[b"not read"]), no_progress)
            assert caught.value.code == "too_large", caught.value
            assert caught.value.reason == (
                f"{kind.value} at 96x72 (6912 pixels) is more than the 6144 the runtime allows "
                "(generate_max_pixels); use a smaller width/height"
            )
        assert runtime.loaded_model is None  # refused before any model loaded
        small, big = job(width=64, height=96), job(width=96, height=96)
        outcomes = await runtime.run_batch([small, big], [no_progress, no_progress])
        assert isinstance(outcomes[1], Reject) and outcomes[1].code == "too_large", outcomes
        assert not isinstance(outcomes[0], BaseException) and len(outcomes[0].images) == 1, outcomes
    finally:
        await runtime.aclose()


def test_out_of_memory_detection() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.fixture
def oom_runtime(catalog: ModelCatalog) -> Iterator[DiffusersRuntime]:
    yield DiffusersRuntime(catalog, default_model="tiny-a", device="cpu")


def fail_unet(rt: DiffusersRuntime, model: str, error: Exception, mp: pytest.MonkeyPatch) -> None:
    def forward(*args: object, **kwargs: object) -> None:
        raise error

    mp.setattr(rt._cache[model].pipe.unet, "forward", forward)


async def test_cuda_oom_is_a_clear_task_error_then_runtime_works(oom_runtime: DiffusersRuntime) -> None:
    rt = oom_runtime
    await rt.start()
    with pytest.MonkeyPatch.context() as mp:
        fail_unet(rt, "tiny-a", torch.cuda.OutOfMemoryError("CUDA out of memory. Tried 9 GiB"), mp)
        with pytest.raises(Reject) as e:
            await rt.run(job(width=64, height=48, batch_size=2), no_progress)
    assert e.value.code == "out_of_memory"
    assert "text-to-image of 2 image(s) at 64x48" in e.value.reason
    assert "smaller width/height or batch_size" in e.value.reason
    assert isinstance(e.value.__cause__, torch.cuda.OutOfMemoryError)
    result = await rt.run(job(), no_progress)
    assert len(result.images) == 1 and rt.cached_models == ["tiny-a"]


async def test_cpu_oom_in_img2img(oom_runtime: DiffusersRuntime) -> None:
    rt = oom_runtime
    src = (await rt.run(job(), no_progress)).images[0]
    i2i = job(TaskType.IMAGE_TO_IMAGE, init_images=[src], denoising_strength=0.5)
    with pytest.MonkeyPatch.context() as mp:
        fail_unet(rt, "tiny-a", RuntimeError("DefaultCPUAllocator: can't allocate memory"), mp)
        with pytest.raises(Reject, match="out of memory on cpu: image-to-image of 1 image"):
            await rt.run(i2i, no_progress)
        fail_unet(rt, "tiny-a", RuntimeError("mat1 and mat2 shapes cannot be multiplied"), mp)
        with pytest.raises(RuntimeFailure) as other:
            await rt.run(i2i, no_progress)
    assert other.value.code == "runtime_failure"
    assert len((await rt.run(i2i, no_progress)).images) == 1


async def test_oom_with_other_models_cached_unloads_them_and_retries(
    oom_runtime: DiffusersRuntime,
) -> None:
    rt = oom_runtime
    await rt.run(job(model="tiny-a"), no_progress)
    await rt.run(job(model="tiny-b"), no_progress)
    assert rt.cached_models == ["tiny-a", "tiny-b"]
    with pytest.MonkeyPatch.context() as mp:
        fail_unet(rt, "tiny-b", MemoryError(), mp)
        with pytest.raises(RuntimeFailure) as e:
            await rt.run(job(model="tiny-b"), no_progress)
    assert e.value.code == "out_of_memory" and "unloaded other cached models" in e.value.message
    assert rt.cached_models == ["tiny-b"]
    assert len((await rt.run(job(model="tiny-b"), no_progress)).images) == 1


async def test_generations_run_on_one_thread(oom_runtime: DiffusersRuntime) -> None:
    rt = oom_runtime
    await rt.start()
    unet = rt._cache["tiny-a"].pipe.unet
    seen: set[str] = set()
    original = unet.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        seen.add(threading.current_thread().name)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(unet, "forward", forward)
        for _ in range(3):
            await rt.run(job(), no_progress)
    assert len(seen) == 1 and seen.pop().startswith("sdfleet-diffusers")
    await rt.aclose()
    assert len((await rt.run(job(), no_progress)).images) == 1  # usable again after aclose
