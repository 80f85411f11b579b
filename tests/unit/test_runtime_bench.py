"""The random SD 1.5-architecture configs and the runtime speed benchmark (tiny model, CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).parents[2] / "bench" / "runtime_speed.py"


def test_random_sd15_has_the_sd15_parameter_counts() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdfleet.models.random_sd15 import UNET, VAE

    with torch.device("meta"):  # shapes only: no memory, no init time
        unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
    # The published parameter counts of SD 1.5's UNet and VAE.
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("runtime_speed", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_variant() -> None:
    bench = load_bench()
    assert bench.parse_variant("fast:dtype=fp16,compile=true,channels_last=false") == (
        "fast",
        {"dtype": "fp16", "compile": True, "channels_last": False},
    )
    assert bench.parse_variant(":") == ("default", {})


async def test_bench_runs_the_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench()
    argv = ["--make-tiny", str(tmp_path / "models"), "--sizes", "64", "--steps", "1", "--repeat", "2"]
    argv += ["--variant", "a:device=cpu", "--variant", "b:device=cpu,channels_last=true"]
    rows = await bench.main([*argv, "--results", str(tmp_path / "out")])
    assert [(r["variant"], r["size"], r["device"]) for r in rows] == [("a", 64, "cpu"), ("b", 64, "cpu")]
    assert all(r["s_per_image_mean"] > 0 for r in rows)
    (written,) = (tmp_path / "out").glob("runtime_speed-tiny-bench-*.json")
    data = json.loads(written.read_text())
    assert data["rows"] == rows and data["steps"] == 1 and "torch" in data["machine"]
    assert "| b | cpu | float32 | 64x64 |" in capsys.readouterr().out
