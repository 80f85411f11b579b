"""Weighted latency histograms and time series, cheap enough for 86 M tasks.

Latencies go into log-spaced bins (100 per decade: ±1.2 % on a percentile) with a weight each, so
a cohort of a thousand requests costs one entry; values are buffered and binned in bulk.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

PER_DECADE = 100
LO, HI = 1e-4, 1e7
EDGES = np.logspace(np.log10(LO), np.log10(HI), int(np.log10(HI / LO)) * PER_DECADE + 1)
COARSE = np.logspace(-3, 6, 9 * 10 + 1)
"""Bins of the per-window histograms behind the latency-over-time plot."""


class Hist:
    """A weighted histogram of seconds, with exact count, sum and maximum."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(EDGES) + 1)
        self.n = 0.0
        self.total = 0.0
        self.max = 0.0
        self._values: list[float] = []
        self._weights: list[float] = []

    def add(self, value: float, weight: float = 1.0) -> None:
        self._values.append(value)
        self._weights.append(weight)
        if len(self._values) >= 65536:
            self._flush()

    def _flush(self) -> None:
        if not self._values:
            return
        v, w = np.asarray(self._values), np.asarray(self._weights)
        np.add.at(self.counts, np.searchsorted(EDGES, v), w)
        self.n += float(w.sum())
        self.total += float((v * w).sum())
        self.max = max(self.max, float(v.max()))
        self._values.clear()
        self._weights.clear()

    @classmethod
    def merged(cls, hists: list[Hist]) -> Hist:
        out = cls()
        for h in hists:
            h._flush()
            out.counts += h.counts
            out.n += h.n
            out.total += h.total
            out.max = max(out.max, h.max)
        return out

    def quantile(self, q: float) -> float:
        """The ``q`` quantile, read at the geometric middle of its bin (clamped to the maximum)."""
        self._flush()
        if self.n == 0:
            return 0.0
        i = int(np.searchsorted(np.cumsum(self.counts), q * self.n, side="left"))
        if i == 0:
            return min(LO, self.max)
        if i >= len(EDGES):
            return self.max
        return min(float(np.sqrt(EDGES[i - 1] * EDGES[i])), self.max)

    def summary(self) -> dict[str, float]:
        self._flush()
        if self.n == 0:
            return {"n": 0.0}
        out = {"n": self.n, "mean": self.total / self.n}
        out |= {f"p{round(q * 100)}": self.quantile(q) for q in (0.5, 0.95, 0.99)}
        return out | {"max": self.max}


@dataclass
class Series:
    """Samples every ``step_s``: one list per name (backlog, replicas, nodes ...)."""

    step_s: float
    t: list[float] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def sample(self, now: float, row: dict[str, float]) -> None:
        self.t.append(now)
        for k, v in row.items():
            self.values[k].append(v)


class Windows:
    """Per-window coarse latency histograms of one queue, for percentiles over time."""

    def __init__(self, step_s: float, horizon_s: float) -> None:
        self.step_s = step_s
        self.counts = np.zeros((int(horizon_s // step_s) + 2, len(COARSE) + 1))
        self._rows: list[tuple[float, float, float]] = []
        self.last_at = 0.0
        """When the last request finished."""

    def add(self, at: float, value: float, weight: float) -> None:
        self.last_at = max(self.last_at, at)
        self._rows.append((at, value, weight))
        if len(self._rows) >= 65536:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        a = np.asarray(self._rows)
        w = np.clip((a[:, 0] // self.step_s).astype(np.int64), 0, len(self.counts) - 1)
        np.add.at(self.counts, (w, np.searchsorted(COARSE, a[:, 1])), a[:, 2])
        self._rows.clear()

    def quantiles(self, q: float) -> tuple[np.ndarray, np.ndarray]:
        """Window starts and the ``q`` quantile in each (NaN where nothing finished)."""
        self._flush()
        cum = np.cumsum(self.counts, axis=1)
        n = cum[:, -1]
        idx = np.array([np.searchsorted(row, q * t) if t > 0 else 0 for row, t in zip(cum, n, strict=True)])
        mids = np.concatenate([[COARSE[0]], np.sqrt(COARSE[:-1] * COARSE[1:]), [COARSE[-1]]])
        values = np.where(n > 0, mids[np.clip(idx, 0, len(mids) - 1)], np.nan)
        return np.arange(len(n)) * self.step_s, values


@dataclass
class Counters:
    """Totals of the run, by name (``arrived``, ``completed``, ``switches`` ...) and queue."""

    by_queue: dict[str, dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )

    def add(self, queue: str, name: str, value: float = 1.0) -> None:
        self.by_queue[queue][name] += value

    def get(self, queue: str, name: str) -> float:
        return self.by_queue[queue][name]

    def total(self, name: str) -> float:
        return sum(c[name] for c in self.by_queue.values())
