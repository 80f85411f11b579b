"""PNG plots of a run: backlog, replicas and nodes, latency over time (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdfleet.errors import ConfigError
from sdfleet.simulate.engine import Result


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("plots need matplotlib: pip install 'sdfleet[simulate]'") from e
    return plt


def _hours(result: Result) -> bool:
    return result.horizon_s > 4 * 3600


def _x(result: Result, t: list[float]) -> list[float]:
    return [v / 3600 for v in t] if _hours(result) else t


def plot_all(result: Result, out: Path) -> list[Path]:
    """Write backlog.png, replicas.png and latency.png into ``out``; their paths."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    paths = [_backlog(plt, result, out), _replicas(plt, result, out), _latency(plt, result, out)]
    plt.close("all")
    return paths


def _axes(plt: Any, title: str, ylabel: str, result: Result) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("time (h)" if _hours(result) else "time (s)")
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, ax: Any, path: Path) -> Path:
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _backlog(plt: Any, result: Result, out: Path) -> Path:
    s = result.series
    fig, ax = _axes(plt, "Queue backlog (solid: visible, dotted: in flight)", "requests", result)
    x = _x(result, s.t)
    for i, name in enumerate(result.queues):
        ax.plot(x, s.values[f"{name}.visible"], color=_colour(i), label=name)
        ax.plot(x, s.values[f"{name}.in_flight"], color=_colour(i), linestyle=":")
    return _save(fig, ax, out / "backlog.png")


def _replicas(plt: Any, result: Result, out: Path) -> Path:
    s = result.series
    fig, ax = _axes(plt, "Replicas (solid: ready, dashed: KEDA/HPA desired) and GPUs", "count", result)
    x = _x(result, s.t)
    for i, name in enumerate(result.queues):
        ax.step(x, s.values[f"{name}.ready"], where="post", color=_colour(i), label=name)
        ax.step(x, s.values[f"{name}.desired"], where="post", color=_colour(i), linestyle="--", alpha=0.7)
    if result.params.nodes.enabled:
        n = len(result.queues)
        ax.step(
            x,
            s.values["gpus_spot"],
            where="post",
            color=_colour(n),
            linewidth=2.5,
            alpha=0.5,
            label="GPUs spot",
        )
        gpus_od = s.values["gpus_on_demand"]
        ax.step(
            x, gpus_od, where="post", color=_colour(n + 1), linewidth=2.5, alpha=0.5, label="GPUs on-demand"
        )
    return _save(fig, ax, out / "replicas.png")


def _latency(plt: Any, result: Result, out: Path) -> Path:
    title = "End to end, requests finished per interval (solid: p50, dashed: p95)"
    fig, ax = _axes(plt, title, "seconds", result)
    for i, (name, run) in enumerate(result.queues.items()):
        for q, style in ((0.5, "-"), (0.95, "--")):
            t, v = run.windows.quantiles(q)
            label = name if q == 0.5 else None
            ax.plot(_x(result, list(t)), v, color=_colour(i), linestyle=style, label=label)
    ax.set_yscale("log")
    return _save(fig, ax, out / "latency.png")
