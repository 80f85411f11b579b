"""Arrivals: a trace file (CSV or JSON lines) or a generator spec (YAML), as columns of numpy arrays.

A trace row is one request, or ``count`` identical ones: ``time`` (seconds from the start),
``model``, ``width``, ``height``, ``steps``, ``tenant`` and optionally ``tier`` (default: the
fleet file's tier of that tenant name, else ``standard``), ``images`` (per request, default 1) and
``count`` (default 1). A day at 1,000 requests/s is best given as per-second counts.

A generator spec draws Poisson counts per time bin, vectorised, from a rate that may combine a
constant, a diurnal sine and bursts::

    duration_s: 3600
    rate: 5                      # requests/s
    diurnal: {peak_to_mean: 1.8, period_s: 86400, peak_at_s: 50400}
    bursts: [{at_s: 600, duration_s: 120, rate: 40}]
    mix:
      - {model: sd15, width: 512, height: 512, steps: 30, tenant: acme, weight: 3}
      - {model: sdxl, width: 1024, height: 1024, steps: 30, tenant: paid-co, tier: paid, weight: 1}
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdfleet.errors import ConfigError, one_line


@dataclass(frozen=True)
class TaskClass:
    """What the fleet needs to know of a request: routing keys and GPU work."""

    model: str | None
    width: int
    height: int
    steps: int
    tenant: str
    tier: str
    images: int = 1

    def __str__(self) -> str:
        images = f", {self.images} images" if self.images > 1 else ""
        what = f"{self.model or '(default model)'} {self.width}x{self.height} {self.steps} steps{images}"
        return f"{what}, tenant {self.tenant} ({self.tier})"

    @property
    def batch_key(self) -> tuple[str | None, int, int, int, int]:
        """Requests with the same key can share one batched runtime call."""
        return (self.model, self.width, self.height, self.steps, self.images)


@dataclass
class Arrivals:
    """``n[i]`` requests of class ``classes[cls[i]]`` arriving at ``t[i]`` (sorted)."""

    classes: list[TaskClass]
    t: np.ndarray
    cls: np.ndarray
    n: np.ndarray

    @property
    def total(self) -> int:
        return int(self.n.sum())

    @property
    def end(self) -> float:
        return float(self.t[-1]) if len(self.t) else 0.0

    def binned(self, dt: float) -> Arrivals:
        """One cohort per (bin of width ``dt``, class), placed at the middle of its bin."""
        if dt <= 0 or not len(self.t):
            return self
        k = len(self.classes)
        key = np.floor(self.t / dt).astype(np.int64) * k + self.cls
        uniq, inverse = np.unique(key, return_inverse=True)
        counts = np.bincount(inverse, weights=self.n).astype(np.int64)
        return Arrivals(self.classes, (uniq // k + 0.5) * dt, (uniq % k).astype(np.int32), counts)


class MixEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    width: int = Field(512, ge=8)
    height: int = Field(512, ge=8)
    steps: int = Field(30, ge=1)
    tenant: str = "default"
    tier: str | None = None
    images: int = Field(1, ge=1)
    weight: float = Field(1.0, gt=0)


class Diurnal(BaseModel):
    model_config = ConfigDict(extra="forbid")
    peak_to_mean: float = Field(1.5, ge=1.0, le=2.0)
    period_s: float = Field(86400.0, gt=0)
    peak_at_s: float = 50400.0


class Burst(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    rate: float = Field(gt=0)


class Generator(BaseModel):
    """A synthetic workload: Poisson arrivals from a rate that varies in time."""

    model_config = ConfigDict(extra="forbid")
    duration_s: float = Field(gt=0)
    rate: float = Field(0.0, ge=0)
    diurnal: Diurnal | None = None
    bursts: list[Burst] = Field(default_factory=list)
    mix: list[MixEntry] = Field(default_factory=lambda: [MixEntry()])
    seed: int = 0

    def rate_at(self, t: np.ndarray) -> np.ndarray:
        rate = np.full_like(t, self.rate, dtype=np.float64)
        if self.diurnal is not None:
            d = self.diurnal
            rate *= 1 + (d.peak_to_mean - 1) * np.cos(2 * math.pi * (t - d.peak_at_s) / d.period_s)
        for b in self.bursts:
            rate += np.where((t >= b.at_s) & (t < b.at_s + b.duration_s), b.rate, 0.0)
        return rate

    def expected_total(self) -> float:
        grid = np.arange(0.0, self.duration_s, 1.0) + 0.5
        return float(self.rate_at(grid).sum())

    def draw(self, tiers: Mapping[str, str], dt: float) -> Arrivals:
        """Poisson counts per ``dt`` bin and class; ``dt`` 0: one row per request, uniform in
        its one-second bin."""
        rng = np.random.default_rng(self.seed)
        step = dt if dt > 0 else 1.0
        starts = np.arange(0.0, self.duration_s, step)
        weights = np.array([m.weight for m in self.mix])
        lam = self.rate_at(starts + step / 2)[:, None] * step * (weights / weights.sum())[None, :]
        counts = rng.poisson(lam)
        bins, cls = np.nonzero(counts)
        n = counts[bins, cls].astype(np.int64)
        classes = [_mix_class(m, tiers) for m in self.mix]
        if dt > 0:
            return Arrivals(classes, starts[bins] + step / 2, cls.astype(np.int32), n)
        t = np.repeat(starts[bins], n) + rng.random(int(n.sum())) * step
        order = np.argsort(t, kind="stable")
        cls_each = np.repeat(cls, n)[order].astype(np.int32)
        return Arrivals(classes, t[order], cls_each, np.ones(len(t), dtype=np.int64))


def _mix_class(m: MixEntry, tiers: Mapping[str, str]) -> TaskClass:
    tier = m.tier or tiers.get(m.tenant, "standard")
    return TaskClass(m.model, m.width, m.height, m.steps, m.tenant, tier, m.images)


def _rows(path: Path) -> Iterable[Mapping[str, Any]]:
    if path.suffix in (".jsonl", ".ndjson"):
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}:{n}: not JSON: {e}") from e
    else:
        with path.open(newline="") as f:
            yield from csv.DictReader(f)


def _row_class(row: Mapping[str, Any], tiers: Mapping[str, str]) -> TaskClass:
    tenant = str(row.get("tenant") or "default")
    model = row.get("model") or None
    return TaskClass(
        str(model) if model is not None else None,
        int(row.get("width") or 512),
        int(row.get("height") or 512),
        int(row.get("steps") or 30),
        tenant,
        str(row.get("tier") or tiers.get(tenant, "standard")),
        int(row.get("images") or 1),
    )


def read_trace(path: Path, tiers: Mapping[str, str]) -> Arrivals:
    """A CSV or JSON-lines trace. Raises ``ConfigError`` naming the first bad row."""
    index: dict[TaskClass, int] = {}
    t: list[float] = []
    cls: list[int] = []
    n: list[int] = []
    try:
        for line, row in enumerate(_rows(path), 2):
            try:
                c = _row_class(row, tiers)
                t.append(float(row["time"]))
                n.append(int(row.get("count") or 1))
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(
                    f"{path}: row {line}: {e!r} (time, model, width, height, steps, tenant)"
                ) from e
            cls.append(index.setdefault(c, len(index)))
    except OSError as e:
        raise ConfigError(f"cannot read trace {path}: {e}") from e
    if not t:
        raise ConfigError(f"{path}: the trace has no rows")
    ta = np.asarray(t, dtype=np.float64)
    order = np.argsort(ta, kind="stable")
    return Arrivals(
        list(index), ta[order], np.asarray(cls, dtype=np.int32)[order], np.asarray(n, dtype=np.int64)[order]
    )


AUTO_EXACT_MAX = 200_000
"""Above this many requests, ``resolution_s: auto`` bins arrivals per second."""


def pick_resolution(resolution: float | str, total: float) -> float:
    if resolution == "auto":
        return 0.0 if total <= AUTO_EXACT_MAX else 1.0
    return float(resolution)


def load_arrivals(path: Path, tiers: Mapping[str, str], resolution: float | str) -> tuple[Arrivals, float]:
    """A trace file, or a generator spec when ``path`` ends in .yaml/.yml; returns the arrivals
    and the bin width used (0: one row per request, as given)."""
    if path.suffix not in (".yaml", ".yml"):
        arrivals = read_trace(path, tiers)
        dt = pick_resolution(resolution, arrivals.total)
        return arrivals.binned(dt), dt
    try:
        spec = Generator.model_validate(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read workload {path}: {one_line(e)}") from e
    except ValidationError as e:
        raise ConfigError(f"workload {path}: {one_line(e)}") from e
    dt = pick_resolution(resolution, spec.expected_total())
    return spec.draw(tiers, dt), dt
