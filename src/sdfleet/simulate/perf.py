"""GPU performance table: seconds per runtime call by GPU, model family, size, steps and batch.

Shipped points come from public measurements (``source`` says which); a point for the same GPU,
family, size and steps from ``sdfleet bench`` results replaces them. Between the measured batch
sizes the time is interpolated linearly; past the largest it grows by the last slope (by whole
batches when only batch 1 is known: no batching gain is assumed). Other sizes and step counts
scale the nearest measured point linearly in pixels and steps — a first-order model that
``sdfleet bench runtime_speed`` on the real GPU should replace.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdfleet.errors import ConfigError, cannot_read, one_line


class PerfPoint(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    gpu: str
    family: str
    width: int = Field(ge=8)
    height: int = Field(ge=8)
    steps: int = Field(ge=1)
    batch: int = Field(1, ge=1)
    seconds: float = Field(gt=0)
    """One runtime call generating ``batch`` images."""
    source: str = ""


_ENV = "this project's H200 lease, diffusers 0.42, fp16, Euler (/work/shared/ENVIRONMENT.md)"
_HF = "diffusers docs, optimization/torch2.0 benchmark, torch 2.0 SDPA, no compile, fp16, 50 steps"
_DECI = "Deci/DeciDiffusion-v1-0 model card: SD 1.5 on A10, PyTorch fp16, 50 iterations"


def _p(gpu: str, family: str, size: int, steps: int, batch: int, seconds: float, source: str) -> PerfPoint:
    return PerfPoint(
        gpu=gpu,
        family=family,
        width=size,
        height=size,
        steps=steps,
        batch=batch,
        seconds=seconds,
        source=source,
    )


DEFAULT_POINTS: list[PerfPoint] = [
    _p("h200", "sd15", 512, 30, 1, 0.78, _ENV),
    _p("h200", "sd15", 512, 30, 4, 0.93, _ENV),
    _p("h200", "sdxl", 1024, 30, 1, 2.0, _ENV),
    # it/s of the whole batch → seconds = 50 / (it/s)
    _p("a100", "sd15", 512, 50, 1, 50 / 21.66, _HF),
    _p("a100", "sd15", 512, 50, 4, 50 / 11.6, _HF),
    _p("a100", "sd15", 512, 50, 16, 50 / 3.04, _HF),
    _p("v100", "sd15", 512, 50, 1, 50 / 18.99, _HF),
    _p("v100", "sd15", 512, 50, 4, 50 / 5.96, _HF),
    _p("t4", "sd15", 512, 50, 1, 50 / 6.9, _HF),
    _p("t4", "sd15", 512, 50, 4, 50 / 1.79, _HF),
    _p("a10g", "sd15", 512, 50, 1, 2.95, _DECI),
    # Estimates, no public number at hand: an H100 as the H200 (same GH100 compute, less memory
    # bandwidth); an L4 as the A10 (121 vs 125 dense fp16 tensor TFLOPS). Measure and override.
    _p("h100", "sd15", 512, 30, 1, 0.78, "estimate: as h200"),
    _p("h100", "sd15", 512, 30, 4, 0.93, "estimate: as h200"),
    _p("h100", "sdxl", 1024, 30, 1, 2.0, "estimate: as h200"),
    _p("l4", "sd15", 512, 50, 1, 2.95, "estimate: as a10g"),
]

FAMILY_COST = {"sdxl": 2.0 / 0.78}
"""Time of a family at its native size relative to SD 1.5 at 512² on the same GPU (H200 row)."""
NATIVE = {"sd15": 512, "sdxl": 1024}


def family_of(model: str | None, mapping: dict[str, str]) -> str:
    if model is not None and model in mapping:
        return mapping[model]
    return "sdxl" if model is not None and "xl" in model.lower() else "sd15"


class PerfTable:
    def __init__(self, points: list[PerfPoint]) -> None:
        self.points: dict[tuple[str, str], list[PerfPoint]] = {}
        for p in points:
            group = self.points.setdefault((p.gpu, p.family), [])
            # a later point for the same size, steps and batch replaces an earlier one
            group[:] = [q for q in group if (q.width, q.height, q.steps, q.batch) != _shape(p)]
            group.append(p)

    @property
    def gpus(self) -> list[str]:
        return sorted({g for g, _ in self.points})

    def seconds(self, gpu: str, family: str, width: int, height: int, steps: int, batch: int) -> float:
        """One runtime call of ``batch`` images. Raises ``ConfigError`` for an unknown GPU."""
        group = self.points.get((gpu, family))
        factor = 1.0
        if group is None:
            group = self.points.get((gpu, "sd15"))
            if group is None:
                raise ConfigError(f"no performance figures for GPU {gpu!r}; known: {', '.join(self.gpus)}")
            native = NATIVE.get(family, 512)
            factor = FAMILY_COST.get(family, 1.0) * (512 * 512) / (native * native)
        px = width * height
        ref = min(group, key=lambda p: (abs(p.width * p.height - px), abs(p.steps - steps)))
        same = sorted((p for p in group if _shape(p)[:3] == _shape(ref)[:3]), key=lambda p: p.batch)
        base = _interpolate([(p.batch, p.seconds) for p in same], batch)
        return base * factor * (px / (ref.width * ref.height)) * (steps / ref.steps)


def _shape(p: PerfPoint) -> tuple[int, int, int, int]:
    return (p.width, p.height, p.steps, p.batch)


def _interpolate(points: list[tuple[int, float]], batch: int) -> float:
    if len(points) == 1:
        b0, s0 = points[0]
        return s0 * batch / b0
    for (b0, s0), (b1, s1) in itertools.pairwise(points):
        if batch <= b1:
            return s0 + (s1 - s0) * (batch - b0) / (b1 - b0)
    (b0, s0), (b1, s1) = points[-2], points[-1]
    return s1 + (s1 - s0) / (b1 - b0) * (batch - b1)


def load_points(path: Path, *, gpu: str | None = None, family: str = "sd15") -> list[PerfPoint]:
    """Points from ``sdfleet bench run runtime_speed`` JSON (needs ``gpu``; each row's size, the
    file's steps and batch) or a YAML/JSON file ``{points: [{gpu, family, width, ...}]}``."""
    try:
        data: Any = (
            yaml.safe_load(path.read_text())
            if path.suffix in (".yaml", ".yml")
            else json.loads(path.read_text())
        )
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise cannot_read("performance figures", path, e) from e
    try:
        if isinstance(data, dict) and "rows" in data:
            if gpu is None:
                raise ConfigError(f"{path} is a runtime_speed result: say which GPU it ran on (--perf-gpu)")
            steps, batch = int(data["steps"]), int(data.get("batch", 1))
            return [
                _p(gpu, family, int(r["size"]), steps, batch, float(r["s_per_image_mean"]) * batch, str(path))
                for r in data["rows"]
            ]
        return [PerfPoint.model_validate(p) for p in data["points"]]
    except (KeyError, TypeError, ValueError, ValidationError) as e:
        raise ConfigError(f"{path}: not a runtime_speed result nor {{points: [...]}}: {one_line(e)}") from e
