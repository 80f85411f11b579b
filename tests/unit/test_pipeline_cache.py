"""The diffusers runtime's pipeline cache: footprints, the memory budget, estimates from disk."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch

from sdfleet.errors import ConfigError
from sdfleet.models import ModelCatalog, make_tiny
from sdfleet.runtimes import _pipeline_cache as C
from sdfleet.runtimes import build_runtime
from sdfleet.runtimes._diffusers_opts import DiffusersOptions
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType

CACHE_LOG = "sdfleet.runtimes._pipeline_cache"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> ModelCatalog:
    root = tmp_path_factory.mktemp("models")
    for n, name in enumerate(("tiny-a", "tiny-b", "tiny-c")):
        make_tiny(root, name, seed=n)
    make_tiny(root, "tiny-sf", seed=0, single_file=True)
    return ModelCatalog(root)


@pytest.fixture(scope="module")
def footprint(catalog: ModelCatalog) -> int:
    """Measured bytes of one tiny model (fp32, CPU); the three tiny models have the same shapes."""
    rt = DiffusersRuntime(catalog, device="cpu")
    loaded = rt._load(catalog.resolve("tiny-a"))
    return loaded.footprint


def runtime(catalog: ModelCatalog, budget_bytes: float, cache_size: int = 10) -> DiffusersRuntime:
    opts = DiffusersOptions(device="cpu", memory_budget_mb=budget_bytes / C.MIB)
    return DiffusersRuntime(catalog, cache_size=cache_size, options=opts)


def job(model: str | None) -> Job:
    params = TaskParams.model_validate({"prompt": "a cat", "steps": 2, "width": 64, "height": 64})
    return Job("t-1", TaskType.TEXT_TO_IMAGE, model, params)


async def no_progress(value: float) -> None:
    return None


def test_footprint_is_the_bytes_of_parameters_and_buffers(catalog: ModelCatalog) -> None:
    rt = DiffusersRuntime(catalog, device="cpu")
    pipe = rt._load(catalog.resolve("tiny-b")).pipe
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    params = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    measured = C.measure_footprint(pipe)
    assert params > 1_000_000
    assert params <= measured <= params * 1.01  # buffers (position ids) are a few KiB
    pipe.to(torch.float16)
    assert C.measure_footprint(pipe) < measured * 0.51


async def test_budget_for_two_models_evicts_the_least_recently_used(
    catalog: ModelCatalog, footprint: int, caplog: pytest.LogCaptureFixture
) -> None:
    rt = runtime(catalog, footprint * 2.5)
    await rt.run(job("tiny-a"), no_progress)
    await rt.run(job("tiny-b"), no_progress)
    await rt.run(job("tiny-a"), no_progress)  # tiny-b is now the least recently used
    assert rt.cached_models == ["tiny-b", "tiny-a"]
    with caplog.at_level(logging.INFO, logger=CACHE_LOG):
        result = await rt.run(job("tiny-c"), no_progress)
    assert result.model == "tiny-c" and rt.loaded_model == "tiny-c"
    assert rt.cached_models == ["tiny-a", "tiny-c"]
    assert list(rt.cached_footprints) == ["tiny-a", "tiny-c"]
    assert all(f == footprint for f in rt.cached_footprints.values())
    assert sum(rt.cached_footprints.values()) <= rt.memory_budget
    evictions = [r.getMessage() for r in caplog.records if "evicted model" in r.getMessage()]
    assert len(evictions) == 1
    assert "evicted model tiny-b" in evictions[0] and "> memory budget" in evictions[0]
    assert len((await rt.run(job(None), no_progress)).images) == 1  # the loaded model: tiny-c
    assert rt.cached_models == ["tiny-a", "tiny-c"]
    await rt.aclose()
    assert rt.cached_models == [] and rt.loaded_model is None


def hires_job(model: str, checkpoint: str) -> Job:
    extra = {"enable_hr": True, "hr_checkpoint_name": checkpoint, "hr_second_pass_steps": 1}
    asked = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "extra": extra}
    return Job("t-2", TaskType.TEXT_TO_IMAGE, model, TaskParams.model_validate(asked))


async def test_a_hires_checkpoint_is_loaded_beside_the_model_it_serves(
    catalog: ModelCatalog, footprint: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A hires pass on another checkpoint needs the two at once: others make room, never the
    first pass's model, which stays the current one; without room the second is held for the job
    alone (the budget is not broken between jobs)."""
    rt = runtime(catalog, footprint * 2.5)
    await rt.run(job("tiny-b"), no_progress)
    await rt.run(job("tiny-a"), no_progress)
    await rt.run(job("tiny-b"), no_progress)  # tiny-a is the least recently used
    await rt.run(hires_job("tiny-a", "tiny-c"), no_progress)
    assert rt.cached_models == ["tiny-a", "tiny-c"] and rt.loaded_model == "tiny-a"
    tight = runtime(catalog, footprint * 1.5)
    with caplog.at_level(logging.WARNING):
        made = await tight.run(hires_job("tiny-a", "tiny-c"), no_progress)
    assert len(made.images) == 1 and tight.cached_models == ["tiny-a"] and tight.loaded_model == "tiny-a"
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "no room for tiny-c beside tiny-a" in m and "t-2's hr_checkpoint_name alone" in m for m in said
    ), said
    await rt.aclose()
    await tight.aclose()


async def test_cache_size_still_bounds_the_count(catalog: ModelCatalog, footprint: int) -> None:
    rt = runtime(catalog, footprint * 100, cache_size=1)
    await rt.run(job("tiny-a"), no_progress)
    await rt.run(job("tiny-b"), no_progress)
    assert rt.cached_models == ["tiny-b"]


async def test_model_over_the_budget_loads_alone_with_a_warning(
    catalog: ModelCatalog, footprint: int, caplog: pytest.LogCaptureFixture
) -> None:
    rt = runtime(catalog, footprint / 2)
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        first = await rt.run(job("tiny-a"), no_progress)
        second = await rt.run(job("tiny-b"), no_progress)
    assert len(first.images) == len(second.images) == 1
    assert rt.cached_models == ["tiny-b"] and rt.loaded_model == "tiny-b"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "tiny-b" in warnings[1] and "larger than the memory budget" in warnings[1]


@pytest.mark.parametrize("model", ["tiny-a", "tiny-sf.safetensors"])
def test_estimate_from_disk_is_close_to_the_measured_footprint(
    catalog: ModelCatalog, footprint: int, model: str
) -> None:
    info = catalog.resolve(model)
    estimate = C.estimate_footprint(info, torch.float32)
    assert footprint / 1.5 <= estimate <= footprint * 1.5
    half = C.estimate_footprint(info, torch.float16)  # float tensors converted from the header
    assert estimate * 0.45 <= half <= estimate * 0.55


def test_weight_files_of_a_folder(tmp_path: Path) -> None:
    for rel in (
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
        "safety_checker/model.safetensors",
        ".cache/huggingface/model.safetensors",
        "unet/config.json",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * 10)
    chosen = {p.relative_to(tmp_path).as_posix() for p in C.weight_files(tmp_path)}
    assert chosen == {
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
    }
    # A file that is not valid safetensors counts by its size.
    assert C.file_footprint(tmp_path / "unet/diffusion_pytorch_model.safetensors", 2) == 10


def test_file_footprint_converts_floats_only(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "ids": {"dtype": "I64", "shape": [2], "data_offsets": [16, 32]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(32))
    assert C.file_footprint(path, 2) == 4 * 2 + 16
    assert C.file_footprint(path, 4) == 32


def test_default_budgets(tmp_path: Path) -> None:
    gib = 2**30
    assert C.cuda_budget(80 * gib) == int(80 * gib * 0.85) - 8 * gib
    assert C.cuda_budget(16 * gib) == int(16 * gib * 0.85) - 2 * gib
    assert C.cuda_budget(gib) == 0
    assert abs(C.default_budget("cpu") - C.available_ram() / 2) < C.available_ram() * 0.1
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  16000000 kB\nMemAvailable:   8000000 kB\n")
    assert C.meminfo_available(meminfo) == 8_000_000 * 1024
    assert C.meminfo_available(tmp_path / "missing") > 0  # sysconf's free pages
    assert C.meminfo_available() > 0


def test_memory_budget_option(catalog: ModelCatalog) -> None:
    rt = build_runtime("diffusers", catalog=catalog, options={"device": "cpu", "memory_budget_mb": 1.5})
    assert isinstance(rt, DiffusersRuntime) and rt.memory_budget == int(1.5 * C.MIB)
    default = build_runtime("diffusers", catalog=catalog, options={"device": "cpu"})
    assert isinstance(default, DiffusersRuntime)
    assert abs(default.memory_budget - C.available_ram() / 2) < C.available_ram() * 0.1
    for bad in (0, -1, "8G", True):
        with pytest.raises(ConfigError, match="memory_budget_mb"):
            build_runtime("diffusers", catalog=catalog, options={"memory_budget_mb": bad})
