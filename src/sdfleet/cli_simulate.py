"""``sdfleet simulate``: plan a fleet before paying for it (see docs/simulate.md)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from sdfleet.cli_common import ConfigOpt, _fail, console, err, print_table
from sdfleet.errors import ConfigError, SdfleetError


@dataclass
class Options:
    trace: Path
    config: Path | None
    gpu: str | None
    params: Path | None
    prices: Path | None
    perf: list[Path]
    perf_gpu: str | None
    perf_family: str
    resolution: str | None
    out: Path | None
    sweep: bool
    grid: Path | None
    objective: str
    jobs: int


_TRACE_HELP = (
    "Trace (CSV or JSON lines: time, model, width, height, steps, tenant[, tier, count]) "
    "or a generator spec (.yaml: rate, diurnal, bursts, mix)."
)
TraceOpt = typer.Option(..., "--trace", "-t", help=_TRACE_HELP)
GpuOpt = typer.Option(None, "--gpu", help="GPU of the nodes: h200, h100, a100, a10g, l4, t4, v100.")
ParamsOpt = typer.Option(None, "--params", help="Simulation parameters (YAML): keda, agent, nodes.")
PricesOpt = typer.Option(None, "--prices", help="Price file: GPU → {on_demand, spot} $/GPU-hour.")
PerfOpt = typer.Option(
    [], "--perf", help="Performance figures: `sdfleet bench run runtime_speed` JSON or {points: [...]}."
)
PerfGpuOpt = typer.Option(None, "--perf-gpu", help="GPU the --perf bench results ran on.")
PerfFamilyOpt = typer.Option("sd15", "--perf-family", help="Model family of the --perf bench results.")
ResolutionOpt = typer.Option(None, help="auto, exact, or a bin width in seconds (aggregate mode).")
OutOpt = typer.Option(None, "--out", "-o", help="Write summary.json, settings.yaml and PNG plots here.")
SweepOpt = typer.Option(
    False, "--sweep", help="Simulate a grid of KEDA/Karpenter settings; pick the cheapest."
)
GridOpt = typer.Option(None, "--grid", help="Sweep grid (YAML: section.field → a list of values).")
ObjectiveOpt = typer.Option("e2e_p95<=60", help="Sweep objective over every queue, e.g. e2e_p95<=60.")
JobsOpt = typer.Option(1, "--jobs", "-j", min=1, help="Sweep runs in parallel.")


def simulate(
    trace: Path = TraceOpt,
    config: Path | None = ConfigOpt,
    gpu: str | None = GpuOpt,
    params: Path | None = ParamsOpt,
    prices: Path | None = PricesOpt,
    perf: list[Path] = PerfOpt,
    perf_gpu: str | None = PerfGpuOpt,
    perf_family: str = PerfFamilyOpt,
    resolution: str | None = ResolutionOpt,
    out: Path | None = OutOpt,
    sweep: bool = SweepOpt,
    grid: Path | None = GridOpt,
    objective: str = ObjectiveOpt,
    jobs: int = JobsOpt,
) -> None:
    """Discrete-event simulation of the fleet the file describes, on a trace: latency, replicas, cost."""
    opts = Options(
        trace,
        config,
        gpu,
        params,
        prices,
        perf,
        perf_gpu,
        perf_family,
        resolution,
        out,
        sweep,
        grid,
        objective,
        jobs,
    )
    try:
        _simulate(opts)
    except SdfleetError as e:
        _fail(e)


def _within_the_apis_size(classes: list[Any], api: Any) -> None:
    """``ConfigError`` for a class the API would refuse by its size limit (``api.max_width`` ×
    ``api.max_height`` of the settings): routing checks the rest as the API does."""
    from sdfleet.errors import ValidationFailed
    from sdfleet.limits import check_output_size
    from sdfleet.tasks import TaskParams, TaskType

    for c in classes:
        size = TaskParams.model_construct(width=c.width, height=c.height)  # bounds: routing's
        try:
            check_output_size(TaskType.TEXT_TO_IMAGE, size, [], api.max_width, api.max_height)
        except ValidationFailed as e:
            raise ConfigError(f"the API would refuse {c}: {e}") from e


def _simulate(o: Options) -> None:
    # Imported here: numpy and simpy stay out of every other command's start-up.
    from sdfleet.settings import load_settings
    from sdfleet.simulate.engine import simulate as run
    from sdfleet.simulate.params import load_params
    from sdfleet.simulate.perf import DEFAULT_POINTS, PerfTable, load_points
    from sdfleet.simulate.pricing import load_prices, price_for
    from sdfleet.simulate.report import summary, table
    from sdfleet.simulate.trace import load_arrivals

    settings = load_settings(o.config)
    fleet = settings.fleet
    overrides: dict[str, Any] = {"nodes": {"gpu": o.gpu}} if o.gpu else {}
    if o.resolution is not None:
        overrides["resolution_s"] = 0.0 if o.resolution == "exact" else o.resolution
    params = load_params(o.params, overrides)
    points = list(DEFAULT_POINTS)
    for f in o.perf:
        points += load_points(f, gpu=o.perf_gpu, family=o.perf_family)
    perf = PerfTable(points)
    if params.nodes.gpu not in perf.gpus and any(q.runtime != "synthetic" for q in fleet.queues):
        raise ConfigError(
            f"no performance figures for GPU {params.nodes.gpu!r}; known: {', '.join(perf.gpus)}"
        )

    price = price_for(load_prices(o.prices), params.nodes.gpu)
    tiers = {t.name: t.tier for t in fleet.tenants.values()}
    arrivals, dt = load_arrivals(o.trace, tiers, params.resolution_s)
    _within_the_apis_size(arrivals.classes, settings.api)
    mode = "exact" if dt == 0 else f"aggregate, {dt:g} s bins"
    requests = f"{arrivals.total:,} request{'' if arrivals.total == 1 else 's'}"
    console.print(f"{requests} over {arrivals.end:,.0f} s ({mode}), GPU {params.nodes.gpu}")
    if o.sweep:
        _sweep(o, fleet, arrivals, params, perf, price, dt)
        return
    result = run(fleet, arrivals, params, perf=perf, price=price, dt=dt)
    s = summary(result)
    print_table(table(s))
    if o.out is not None:
        _write(o.out, s, result)


def _write(out: Path, s: dict[str, Any], result: Any) -> None:
    from sdfleet.simulate.plots import plot_all

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    (out / "settings.yaml").write_text(_settings_yaml(s["settings"], "the settings simulated"))
    paths = plot_all(result, out)
    console.print(
        f"wrote {out / 'summary.json'}, {out / 'settings.yaml'}, " + ", ".join(p.name for p in paths)
    )


def _settings_yaml(settings: dict[str, Any], what: str) -> str:
    head = f"# sdfleet simulate: {what}. Use: sdfleet deploy values --simulated THIS_FILE ...\n"
    return head + yaml.safe_dump(settings, sort_keys=False)


def _sweep(o: Options, fleet: Any, arrivals: Any, params: Any, perf: Any, price: Any, dt: float) -> None:
    from sdfleet.simulate.sweep import Job, Objective, load_grid, sweep

    objective = Objective.parse(o.objective)
    grid = load_grid(o.grid)

    columns = (
        TextColumn("sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        runs = bar.add_task("sweep", total=math.prod(len(values) for values in grid.values()))

        def progress(done: int, total: int) -> None:
            bar.update(runs, completed=done, total=total)

        rows = sweep(
            Job(fleet, arrivals, params, perf, price, dt), grid, objective, jobs=o.jobs, progress=progress
        )
    t = Table(
        *grid,
        f"worst {objective.latency} {objective.percentile}",
        "cost $",
        "GPU-hours",
        "meets",
        title=f"sweep: {len(rows)} runs, objective {objective}",
    )
    for r in rows:
        hours = r.summary["nodes"]["gpu_hours"]["total"]
        t.add_row(
            *(_cell(v) for v in r.point.values()),
            f"{r.worst_s:.1f}s",
            f"{r.cost:.2f}",
            f"{hours:.1f}",
            "yes" if r.met else "no",
        )
    print_table(t)
    best = next((r for r in rows if r.met), None)
    if best is None:
        console.print("[red]no setting in the grid meets the objective[/red]")
        raise typer.Exit(1)
    console.print(f"cheapest meeting {objective}: {best.point} at ${best.cost:.2f}")
    out = o.out
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        rows_json = [
            {"point": r.point, "met": r.met, "worst_s": r.worst_s, "summary": r.summary} for r in rows
        ]
        (out / "sweep.json").write_text(
            json.dumps({"objective": str(objective), "rows": rows_json}, indent=2)
        )
        what = f"cheapest of the sweep meeting {objective}: ${best.cost:.2f}"
        (out / "chosen.yaml").write_text(_settings_yaml(best.summary["settings"], what))
        params = yaml.safe_dump(best.params.model_dump(mode="json"), sort_keys=False)
        (out / "chosen-params.yaml").write_text(f"# sdfleet simulate --params: {what}\n{params}")
        console.print(f"wrote {out / 'sweep.json'}, {out / 'chosen.yaml'} and {out / 'chosen-params.yaml'}")


def _cell(value: Any) -> str:
    """A grid value in a table cell: HPA rules as ``window, Pods 1/60s``."""
    if isinstance(value, dict) and "policies" in value:
        rules = [f"{p['type']} {p['value']}/{p['period_s']:g}s" for p in value["policies"]]
        return ", ".join([f"{value.get('stabilization_s', 0):g}s window", *rules])
    return str(value)
