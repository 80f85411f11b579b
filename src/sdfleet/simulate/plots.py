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


def _backlog(plt: Any, result: Result, out: Path) -> Path:
    s = result.series
    fig, ax = _axes(plt, "Queue backlog", "requests", result)
    x = _x(result, s.t)
    for name in result.queues:
        ax.plot(x, s.values[f"{name}.visible"], label=f"{name} visible")
        ax.plot(x, s.values[f"{name}.in_flight"], linestyle=":", label=f"{name} in flight")
    ax.legend(loc="upper right", fontsize=8)
    path = out / "backlog.png"
    fig.tight_layout()
    fig.savefig(path)
    return path


def _replicas(plt: Any, result: Result, out: Path) -> Path:
    s = result.series
    fig, ax = _axes(plt, "Replicas and GPU nodes", "count", result)
    x = _x(result, s.t)
    for name in result.queues:
        ax.step(x, s.values[f"{name}.desired"], where="post", label=f"{name} desired (KEDA/HPA)")
        ax.step(x, s.values[f"{name}.ready"], where="post", label=f"{name} ready")
    if result.params.nodes.enabled:
        ax.step(x, s.values["gpus_spot"], where="post", linestyle="--", label="GPUs spot")
        ax.step(x, s.values["gpus_on_demand"], where="post", linestyle="--", label="GPUs on-demand")
    ax.legend(loc="upper right", fontsize=8)
    path = out / "replicas.png"
    fig.tight_layout()
    fig.savefig(path)
    return path


def _latency(plt: Any, result: Result, out: Path) -> Path:
    fig, ax = _axes(plt, "End-to-end latency of the requests finished in each interval", "seconds", result)
    for name, run in result.queues.items():
        for q, style in ((0.5, "-"), (0.95, "--")):
            t, v = run.windows.quantiles(q)
            ax.plot(_x(result, list(t)), v, linestyle=style, label=f"{name} p{round(q * 100)}")
    ax.set_yscale("log")
    ax.legend(loc="upper right", fontsize=8)
    path = out / "latency.png"
    fig.tight_layout()
    fig.savefig(path)
    return path
