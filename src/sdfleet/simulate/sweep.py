"""``--sweep``: simulate every combination of a grid of settings; the cheapest meeting an objective.

A grid maps ``section.field`` of the parameters to the values to try (every queue takes them)::

    keda.target_backlog: [2, 5, 10, 20]
    keda.min_replicas: [0, 1]
    keda.cooldown_s: [60, 300]
    nodes.consolidate_after_s: [30, 300]

or for one queue, ``queues.sd15.keda.max_replicas: [10, 20]``. An objective is
``<latency>_<percentile> <= seconds`` over every queue, e.g. ``e2e_p95<=60`` or ``wait_p99<=30``;
a run also fails it when requests are left unfinished or dead-lettered.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sdfleet.errors import ConfigError, cannot_read
from sdfleet.settings import FleetConfig
from sdfleet.simulate.engine import simulate
from sdfleet.simulate.params import SimParams
from sdfleet.simulate.perf import PerfTable
from sdfleet.simulate.pricing import GpuPrice
from sdfleet.simulate.report import summary
from sdfleet.simulate.trace import Arrivals

DEFAULT_GRID: dict[str, list[Any]] = {
    "keda.target_backlog": [2, 5, 10, 20],
    "keda.min_replicas": [0, 1],
    "keda.cooldown_s": [60, 300],
}
_OBJECTIVE = re.compile(r"^\s*(e2e|wait)_p(50|95|99)\s*<=\s*([0-9.]+)\s*s?\s*$")


@dataclass(frozen=True)
class Objective:
    latency: str
    percentile: str
    limit_s: float

    @classmethod
    def parse(cls, text: str) -> Objective:
        m = _OBJECTIVE.match(text)
        if m is None:
            raise ConfigError(f"objective {text!r}: write e.g. e2e_p95<=60 (e2e or wait; p50, p95 or p99)")
        return cls(m.group(1), f"p{m.group(2)}", float(m.group(3)))

    def worst(self, s: dict[str, Any]) -> float:
        key = "e2e_s" if self.latency == "e2e" else "queue_wait_s"
        return max((q[key].get(self.percentile, 0.0) for q in s["queues"].values()), default=0.0)

    def met(self, s: dict[str, Any]) -> bool:
        unfinished = sum(q["left"] + q["dead_lettered"] + q["expired"] for q in s["queues"].values())
        return unfinished == 0 and self.worst(s) <= self.limit_s

    def __str__(self) -> str:
        return f"{self.latency} {self.percentile} <= {self.limit_s:g} s"


def load_grid(path: Path | None) -> dict[str, list[Any]]:
    if path is None:
        return DEFAULT_GRID
    try:
        grid = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise cannot_read("sweep grid", path, e) from e
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: a mapping of section.field → [values] is expected")
    return {str(k): v for k, v in grid.items()}


def points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def with_point(base: SimParams, point: dict[str, Any]) -> SimParams:
    """``base`` with a grid point's values: ``section.field`` for every queue, or
    ``queues.<queue>.<keda|agent>.field`` for one."""
    raw = base.model_dump()
    for key, value in point.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[0] == "queues" and parts[2] in ("keda", "agent"):
            raw["queues"].setdefault(parts[1], {}).setdefault(parts[2], {})[parts[3]] = value
        elif len(parts) == 2 and isinstance(raw.get(parts[0]), dict) and parts[0] != "queues":
            raw[parts[0]][parts[1]] = value
        else:
            raise ConfigError(
                f"sweep key {key!r}: use section.field (keda, agent, nodes) or queues.NAME.keda.field"
            )
    try:
        return SimParams.model_validate(raw)
    except ValueError as e:
        raise ConfigError(f"sweep point {point}: {e}") from e


@dataclass
class Job:
    fleet: FleetConfig
    arrivals: Arrivals
    params: SimParams
    perf: PerfTable
    price: GpuPrice
    dt: float


def _run(job: Job) -> dict[str, Any]:
    return summary(simulate(job.fleet, job.arrivals, job.params, perf=job.perf, price=job.price, dt=job.dt))


@dataclass
class Row:
    point: dict[str, Any]
    params: SimParams
    summary: dict[str, Any]
    met: bool
    worst_s: float

    @property
    def cost(self) -> float:
        return float(self.summary["nodes"]["cost_usd"]["total"])


def sweep(
    job: Job,
    grid: dict[str, list[Any]],
    objective: Objective,
    *,
    jobs: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[Row]:
    """Every grid point simulated; rows sorted cheapest first (meeting the objective before not)."""
    todo = [
        (p, Job(job.fleet, job.arrivals, with_point(job.params, p), job.perf, job.price, job.dt))
        for p in points(grid)
    ]
    rows: list[Row] = []
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = pool.map(_run, [j for _, j in todo])
            for n, ((point, j), s) in enumerate(zip(todo, results, strict=True), 1):
                rows.append(Row(point, j.params, s, objective.met(s), objective.worst(s)))
                if progress:
                    progress(n, len(todo))
    else:
        for n, (point, j) in enumerate(todo, 1):
            s = _run(j)
            rows.append(Row(point, j.params, s, objective.met(s), objective.worst(s)))
            if progress:
                progress(n, len(todo))
    return sorted(rows, key=lambda r: (not r.met, r.cost))
