"""The ``sdfleet`` command line."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from sdfleet.errors import SdfleetError
from sdfleet.settings import Settings, load_settings
from sdfleet.telemetry import setup_logging, setup_tracing

app = typer.Typer(help="sdfleet: asynchronous Stable Diffusion generation at scale.", no_args_is_help=True)
models_app = typer.Typer(help="Models in the models directory.", no_args_is_help=True)
app.add_typer(models_app, name="models")
runtime_app = typer.Typer(help="Runtimes on their own.", no_args_is_help=True)
app.add_typer(runtime_app, name="runtime")
deploy_app = typer.Typer(help="Kubernetes deployment (deploy/helm/sdfleet).", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")
bench_app = typer.Typer(help="Benchmark scenarios of a checkout's bench/ folder.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console()
err = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="Fleet file (default ./sdfleet.yaml if present).")
ApiOpt = typer.Option("http://127.0.0.1:8080", "--api", envvar="SDFLEET_API_URL", help="Base URL of the API.")
HostOpt = typer.Option(None, help="API host (SDFLEET_API__HOST).")
PortOpt = typer.Option(None, help="API port (SDFLEET_API__PORT).")
KeyOpt = typer.Option(
    None, "--api-key", envvar="SDFLEET_API_KEY", help="API key (when tenants are configured)."
)


def _settings(config: Path | None, *, service: str | None = None, **overrides: Any) -> Settings:
    settings = load_settings(config, **overrides)
    setup_logging(settings.log_level, settings.log_json)
    if service is not None:
        setup_tracing(service, settings.otlp_endpoint)
    return settings


def _fail(e: Exception) -> None:
    err.print(f"[red]error:[/red] {e}")
    raise typer.Exit(2)


@app.command()
def demo(
    data_dir: Path = typer.Option(
        Path("sdfleet-demo"), help="Where the demo keeps its database, models, images."
    ),
) -> None:
    """The whole flow on this machine: API, topic, queues, agents, a tiny model, the seed's two requests."""
    from sdfleet.demo import run_demo

    try:
        asyncio.run(run_demo(data_dir, console))
    except SdfleetError as e:
        _fail(e)


@app.command()
def up(
    config: Path | None = ConfigOpt,
    host: str | None = HostOpt,
    port: int | None = PortOpt,
) -> None:
    """API plus one agent per configured queue, in one process."""
    settings = _settings(config, service="sdfleet")
    _apply_listen(settings, host, port)
    _run_fleet(settings, [q.name for q in settings.fleet.queues], with_api=True)


@app.command()
def api(
    config: Path | None = ConfigOpt,
    host: str | None = HostOpt,
    port: int | None = PortOpt,
) -> None:
    """The HTTP API alone (agents run elsewhere)."""
    settings = _settings(config, service="sdfleet-api")
    _apply_listen(settings, host, port)
    _run_fleet(settings, [], with_api=True)


@app.command()
def agent(
    queue: str = typer.Option(..., "--queue", "-q", help="Queue to serve."),
    burst: bool = typer.Option(False, help="Drain the queue, then exit."),
    config: Path | None = ConfigOpt,
    ready_dir: Path | None = typer.Option(None, help="Write <queue>.ready here once the model is loaded."),
    runtime: str | None = typer.Option(
        None, help="Runtime for this queue (diffusers, a1111, comfyui, synthetic, or module:Class)."
    ),
    runtime_url: str | None = typer.Option(
        None, help="URL of the runtime's server (a1111, comfyui), e.g. http://127.0.0.1:7860."
    ),
) -> None:
    """A queue agent: receive tasks one by one and run them.

    Side-car mode next to an SD WebUI container: ``--runtime a1111 --runtime-url http://127.0.0.1:7860``.
    """
    settings = _settings(config, service="sdfleet-agent")
    try:
        _apply_runtime(settings, queue, runtime, runtime_url)
    except SdfleetError as e:
        _fail(e)
    _run_fleet(settings, [queue], with_api=False, burst=burst, ready_dir=ready_dir)


def _apply_runtime(settings: Settings, queue: str, runtime: str | None, url: str | None) -> None:
    """``--runtime``/``--runtime-url`` override the fleet file for this agent's queue."""
    from sdfleet.errors import ConfigError

    q = settings.fleet.queue(queue)
    if q is None:
        raise ConfigError(f"unknown queue {queue!r}; the fleet has {[q.name for q in settings.fleet.queues]}")
    if runtime:
        q.runtime = runtime
    if url:
        settings.fleet.runtimes[q.runtime] = {**settings.fleet.runtimes.get(q.runtime, {}), "url": url}


def _apply_listen(settings: Settings, host: str | None, port: int | None) -> None:
    if host:
        settings.api.host = host
    if port:
        settings.api.port = port


def _run_fleet(settings: Settings, queues: list[str], **kwargs: Any) -> None:
    from sdfleet.serve import Fleet

    async def main() -> None:
        fleet = Fleet(settings, queues, **kwargs)
        fleet.install_signal_handlers()
        await fleet.run()

    try:
        asyncio.run(main())
    except SdfleetError as e:
        _fail(e)


@app.command()
def submit(
    prompt: str | None = typer.Option(None, help="Prompt of a text-to-image task."),
    file: Path | None = typer.Option(None, "--file", "-f", help="JSON body to send ('-' for stdin)."),
    fmt: str = typer.Option("v1", "--format", help="Body format of --file: v1, v1alpha1 or v1alpha2."),
    model: str | None = typer.Option(None, help="Model (checkpoint) name."),
    steps: int = typer.Option(20),
    width: int = typer.Option(512),
    height: int = typer.Option(512),
    seed: int = typer.Option(-1),
    wait: bool = typer.Option(False, help="Wait for the task to finish, with a progress bar."),
    api_url: str = ApiOpt,
    api_key: str | None = KeyOpt,
) -> None:
    """Submit a task; prints its id (and, with --wait, where its images are)."""
    from sdfleet.client import AsyncClient, wait_with_progress

    if file is not None:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
        body = json.loads(text)
    elif prompt is not None:
        params = {"prompt": prompt, "steps": steps, "width": width, "height": height, "seed": seed}
        body = {"model": model, "params": params}
    else:
        _fail(ValueError("give --prompt or --file"))
        return

    async def main() -> None:
        async with AsyncClient(api_url, api_key=api_key) as client:
            task_id = await client.submit_raw(body, fmt=fmt)
            console.print(f"submitted [bold]{task_id}[/bold]")
            if wait:
                view = await wait_with_progress(client, task_id, console)
                _print_result(view)
                if view["state"] != "succeeded":
                    raise typer.Exit(1)

    try:
        asyncio.run(main())
    except SdfleetError as e:
        _fail(e)


def _print_result(view: dict[str, Any]) -> None:
    console.print(f"{view['id']}: [bold]{view['state']}[/bold]")
    if view.get("error"):
        console.print(f"  error: {view['error']['code']}: {view['error']['message']}")
    for image in view.get("images", []):
        console.print(f"  {image['key']}  {image['url']}")


@app.command()
def status(task_id: str, api_url: str = ApiOpt, api_key: str | None = KeyOpt) -> None:
    """Show a task's state, progress and results."""
    from sdfleet.client import AsyncClient

    async def main() -> dict[str, Any]:
        async with AsyncClient(api_url, api_key=api_key) as client:
            return await client.get(task_id)

    try:
        view = asyncio.run(main())
    except SdfleetError as e:
        _fail(e)
        return
    console.print_json(json.dumps(view))


@app.command()
def queues(config: Path | None = ConfigOpt) -> None:
    """Depth of every configured queue, read from the bus itself (SQLite, SQS or Redis)."""
    from sdfleet.bus import open_bus

    settings = _settings(config)

    async def main() -> Table:
        bus = open_bus(settings.bus)
        table = Table("queue", "runtime", "visible", "in flight", "delayed", "oldest age (s)", "dead letters")
        try:
            for q in settings.fleet.queues:
                s = await bus.stats(q.name)
                age = f"{s.oldest_age_s:.1f}" if s.oldest_age_s is not None else "-"
                table.add_row(
                    q.name,
                    q.runtime,
                    *map(str, (s.visible, s.in_flight, s.delayed)),
                    age,
                    str(s.dead_letters),
                )
        finally:
            await bus.aclose()
        return table

    try:
        console.print(asyncio.run(main()))
    except SdfleetError as e:
        _fail(e)


@models_app.command("make-tiny")
def make_tiny_cmd(
    name: str,
    models_dir: Path | None = typer.Option(None, "--dir", help="Models directory (default from settings)."),
    single_file: bool = typer.Option(False, help="Also write a single-file .safetensors checkpoint."),
    seed: int = typer.Option(0),
    sdxl: bool = typer.Option(False, "--sdxl", help="An SDXL pipeline (diffusers folder only)."),
) -> None:
    """Write a tiny random-weight SD pipeline (no download). Its images are noise from a tiny test model."""
    from sdfleet.models.tiny import make_tiny

    target = models_dir or _settings(None).fleet.models.dir
    path = make_tiny(target, name, seed=seed, single_file=single_file, sdxl=sdxl)
    console.print(f"wrote tiny test model {path} (random weights: its images are noise)")


@models_app.command("list")
def models_list(config: Path | None = ConfigOpt) -> None:
    """Models found in the models directory."""
    from sdfleet.models.catalog import ModelCatalog

    settings = _settings(config)
    table = Table("name", "kind", "tiny test model", "path")
    for m in ModelCatalog(settings.fleet.models.dir).list():
        table.add_row(m.name, m.kind, "yes" if m.tiny else "", str(m.path))
    console.print(table)


@deploy_app.command("values")
def deploy_values(
    config: Path | None = ConfigOpt,
    engine: str = typer.Option("aws", help="Bus engine of the cluster: aws or redis."),
    prefix: str | None = typer.Option(None, help="Queue name / key prefix (default: the engine's)."),
    region: str | None = typer.Option(None, envvar="AWS_REGION", help="AWS region (aws)."),
    account: str | None = typer.Option(None, help="AWS account id of the queues (aws)."),
    redis_address: str | None = typer.Option(None, help="host:port of Redis for KEDA (redis)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
) -> None:
    """Helm values for deploy/helm/sdfleet from the fleet file: per queue a worker and its KEDA trigger."""
    import yaml

    from sdfleet.deploy import chart_values

    try:
        settings = load_settings(config)
        values = chart_values(
            settings.fleet,
            engine=engine,  # type: ignore[arg-type]  # checked by chart_values
            prefix=prefix,
            region=region,
            account=account,
            redis_address=redis_address,
            drain_s=settings.agent.drain_s,
        )
    except SdfleetError as e:
        _fail(e)
        return
    text = yaml.safe_dump(values, sort_keys=False)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


@runtime_app.command("serve")
def runtime_serve(
    host: str = typer.Option("127.0.0.1", help="Listen address."),
    port: int = typer.Option(7860, help="Listen port (SD WebUI's default)."),
    models_dir: Path | None = typer.Option(None, help="Models directory (default from settings)."),
    model: str | None = typer.Option(None, help="Checkpoint to load at start."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    config: Path | None = ConfigOpt,
) -> None:
    """The diffusers runtime behind an AUTOMATIC1111-compatible API (/sdapi/v1/...)."""
    import uvicorn

    from sdfleet.models.catalog import ModelCatalog
    from sdfleet.runtime_server import create_app
    from sdfleet.runtimes import build_runtime

    settings = _settings(config)
    catalog = ModelCatalog(models_dir or settings.fleet.models.dir)
    options = {**settings.fleet.runtimes.get("diffusers", {}), "device": device}
    try:
        runtime = build_runtime(
            "diffusers",
            catalog=catalog,
            options=options,
            default_model=model or settings.fleet.models.default,
            cache_size=settings.fleet.models.cache_size,
        )
    except SdfleetError as e:
        _fail(e)
        return
    uvicorn.run(create_app(runtime, catalog), host=host, port=port, log_config=None)


BenchDirOpt = typer.Option(None, "--bench-dir", help="Scenario folder (default: bench/ here or above).")


@bench_app.command("list")
def bench_list(bench_dir: Path | None = BenchDirOpt) -> None:
    """The scenarios in bench/ (run one with `sdfleet bench run NAME -- ARGS`)."""
    from sdfleet.bench import find_bench_dir, list_scenarios

    try:
        folder = find_bench_dir(bench_dir)
    except SdfleetError as e:
        _fail(e)
        return
    table = Table("scenario", "what it measures", title=str(folder))
    for s in list_scenarios(folder):
        table.add_row(s.name, s.summary)
    console.print(table)


@bench_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_run(ctx: typer.Context, name: str, bench_dir: Path | None = BenchDirOpt) -> None:
    """Run scenario NAME; arguments after `--` go to it (`sdfleet bench run NAME -- --help`)."""
    from sdfleet.bench import find_bench_dir, run_scenario

    try:
        code = run_scenario(find_bench_dir(bench_dir), name, list(ctx.args))
    except SdfleetError as e:
        _fail(e)
        return
    raise typer.Exit(code)


def main() -> None:
    # The CLI is the application: it may quiet the ML libraries' import-time advice and progress bars.
    for var, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ):
        os.environ.setdefault(var, value)
    app()
