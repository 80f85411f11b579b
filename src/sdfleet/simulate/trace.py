"""Arrivals: a trace file (CSV or JSON lines) or a generator spec (YAML), as columns of numpy arrays.

A trace row is one request, or ``count`` identical ones: ``time`` (seconds from the start),
``model``, ``width``, ``height``, ``steps``, ``tenant`` and optionally ``tier`` (default: the
fleet file's tier of that tenant name, else ``standard``), ``images`` (per request, default 1) and
``count`` (default 1); an empty cell takes ``Request``'s default. A day at 1,000 requests/s is
best given as per-second counts.

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

from sdfleet.errors import ConfigError, cannot_read, one_line, validation_errors


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


class Request(BaseModel):
    """A class of request as a trace row or a generator's mix gives it (what is left out takes
    these defaults; the API's own bounds are checked when it is routed)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str | None = None
    width: int = Field(512, ge=8)
    height: int = Field(512, ge=8)
    steps: int = Field(30, ge=1)
    tenant: str = "default"
    tier: str | None = None
    images: int = Field(1, ge=1)

    def task_class(self, tiers: Mapping[str, str]) -> TaskClass:
        tier = self.tier or tiers.get(self.tenant, "standard")
        return TaskClass(self.model, self.width, self.height, self.steps, self.tenant, tier, self.images)


class TraceRow(Request):
    time: float = Field(ge=0)
    """Seconds from the start."""
    count: int = Field(1, ge=1)


COLUMNS = "a trace's columns: time, model, width, height, steps, tenant, tier, images, count"


class MixEntry(Request):
    weight: float = Field(1.0, gt=0)


class Diurnal(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    peak_to_mean: float = Field(1.5, ge=1.0, le=2.0)
    period_s: float = Field(86400.0, gt=0)
    peak_at_s: float = 50400.0


class Burst(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    at_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    rate: float = Field(gt=0)


MAX_DURATION_S = 31 * 86400
"""A generator's longest workload: a month (its rate is drawn per second; for longer, simulate a
representative month)."""


class Generator(BaseModel):
    """A synthetic workload: Poisson arrivals from a rate that varies in time."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    duration_s: float = Field(gt=0, le=MAX_DURATION_S)
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
        classes = [m.task_class(tiers) for m in self.mix]
        if dt > 0:
            return Arrivals(classes, starts[bins] + step / 2, cls.astype(np.int32), n)
        t = np.repeat(starts[bins], n) + rng.random(int(n.sum())) * step
        order = np.argsort(t, kind="stable")
        cls_each = np.repeat(cls, n)[order].astype(np.int32)
        return Arrivals(classes, t[order], cls_each, np.ones(len(t), dtype=np.int64))


def _rows(path: Path) -> Iterable[tuple[int, Mapping[str, Any]]]:
    """(line number, row); a CSV's empty cells and JSON's nulls are left out (their defaults apply)."""
    if path.suffix in (".jsonl", ".ndjson"):
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}:{n}: not JSON: {e}") from e
                    if not isinstance(row, dict):
                        raise ConfigError(f"{path}:{n}: a JSON object is expected ({COLUMNS})")
                    yield n, {k: v for k, v in row.items() if v is not None}
    else:
        with path.open(newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                if None in row:
                    raise ConfigError(f"{path}:{n}: more cells than the header has columns")
                yield n, {k: v for k, v in row.items() if v not in ("", None)}


def read_trace(path: Path, tiers: Mapping[str, str]) -> Arrivals:
    """A CSV or JSON-lines trace. Raises ``ConfigError`` naming the first bad row."""
    index: dict[TaskClass, int] = {}
    t: list[float] = []
    cls: list[int] = []
    n: list[int] = []
    try:
        for line, raw in _rows(path):
            if unknown := sorted(set(raw) - set(TraceRow.model_fields)):
                raise ConfigError(f"{path}:{line}: unknown column {', '.join(unknown)} ({COLUMNS})")
            try:
                row = TraceRow.model_validate(raw)
            except ValidationError as e:
                raise ConfigError(f"{path}:{line}: {validation_errors(e)}") from e
            t.append(row.time)
            n.append(row.count)
            cls.append(index.setdefault(row.task_class(tiers), len(index)))
    except OSError as e:
        raise cannot_read("trace", path, e) from e
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
        raise cannot_read("workload", path, e) from e
    except ValidationError as e:
        raise ConfigError(f"workload {path}: {one_line(e)}") from e
    dt = pick_resolution(resolution, spec.expected_total())
    arrivals = spec.draw(tiers, dt)
    if not arrivals.total:
        raise ConfigError(f"workload {path}: it draws no request (raise rate or duration_s, or add bursts)")
    return arrivals, dt
