"""``sdfleet models``, ``runtime``, ``deploy`` and ``bench``: the tool sub-commands."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from sdfleet.cli_common import ConfigOpt, JsonOpt, _fail, _settings, console, err, print_json, print_table
from sdfleet.cli_models import add_transfer_commands
from sdfleet.errors import SdfleetError
from sdfleet.settings import load_settings

models_app = typer.Typer(help="Models: the models folder, S3, the Hugging Face Hub.", no_args_is_help=True)
add_transfer_commands(models_app)
runtime_app = typer.Typer(help="Runtimes on their own.", no_args_is_help=True)
deploy_app = typer.Typer(help="Kubernetes deployment (deploy/helm/sdfleet).", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmark scenarios of a checkout's bench/ folder.", no_args_is_help=True)
BenchDirOpt = typer.Option(None, "--bench-dir", help="Scenario folder (default: bench/ here or above).")


@models_app.command("make-tiny")
def make_tiny_cmd(
    name: str,
    models_dir: Path | None = typer.Option(None, "--dir", help="Models directory (default from settings)."),
    single_file: bool = typer.Option(
        False, help="A single-file .safetensors checkpoint instead of a folder."
    ),
    seed: int = typer.Option(0, help="Seed of the random weights (the same seed writes the same model)."),
    sdxl: bool = typer.Option(False, "--sdxl", help="An SDXL pipeline."),
    sd2: bool = typer.Option(False, "--sd2", help="An SD 2.x pipeline (OpenCLIP text encoder)."),
    sdxl_refiner: bool = typer.Option(
        False, "--sdxl-refiner", help="SDXL's refiner (a task's refiner_checkpoint on an SDXL model)."
    ),
    sidecar: bool = typer.Option(
        True, help="With --single-file, also write NAME.config/ (without it the family is detected)."
    ),
) -> None:
    """Write a tiny random-weight SD pipeline (no download). Its images are noise from a tiny test model."""
    from sdfleet.models.tiny import make_tiny

    if not sidecar and not single_file:
        _fail(ValueError("--no-sidecar is for --single-file (a diffusers folder holds its own configs)"))
    target = models_dir or _settings(None).fleet.models.dir
    kinds = {
        "sdxl": sdxl,
        "sd2": sd2,
        "sdxl_refiner": sdxl_refiner,
        "single_file": single_file,
        "sidecar": sidecar,
    }
    try:
        path = make_tiny(target, name, seed=seed, **kinds)
    except ValueError as e:
        _fail(e)
    console.print(f"wrote tiny test model {path} (random weights: its images are noise)")


@models_app.command("list")
def models_list(
    config: Path | None = ConfigOpt,
    as_json: bool = JsonOpt,
    models_dir: Path | None = typer.Option(None, "--dir", help="Models directory (default: models.dir)."),
) -> None:
    """Models found in the models directory; the default one (models.default, else the first)."""
    from sdfleet.models.catalog import HOW_TO_ADD, ModelCatalog, default_model, folder_named

    settings = _settings(config)
    catalog = ModelCatalog(models_dir or settings.fleet.models.dir)
    models, default = catalog.list(), default_model(settings.fleet.models.default, catalog)
    if as_json:
        rows = [{"name": m.name, "kind": m.kind, "tiny": m.tiny, "path": str(m.path)} for m in models]
        print_json({"dir": str(catalog.models_dir), "default": default, "models": rows})
        return
    if not models:  # an empty table alone does not say why, nor what to do
        # on stdout, as `models ls`, `tasks` and `keys list` say an empty list
        said = f"no models in {folder_named(catalog.models_dir)}: {HOW_TO_ADD}"
        console.print(said, highlight=False, markup=False)
        return
    table = Table("name", "kind", "tiny test model", "default", "path")
    for m in models:
        marks = ("yes" if m.tiny else "", "yes" if m.name == default else "")
        table.add_row(m.name, m.kind, *marks, str(m.path))
    print_table(table)


@deploy_app.command("values")
def deploy_values(
    config: Path | None = ConfigOpt,
    engine: str = typer.Option("aws", help="Bus engine of the cluster: aws or redis."),
    prefix: str | None = typer.Option(None, help="Queue name / key prefix (default: the engine's)."),
    region: str | None = typer.Option(None, envvar="AWS_REGION", help="AWS region (aws)."),
    account: str | None = typer.Option(None, help="AWS account id of the queues (aws)."),
    redis_address: str | None = typer.Option(None, help="host:port of Redis for KEDA (redis)."),
    redis_password_secret: str | None = typer.Option(
        None, help="Secret NAME[:KEY] of the Redis password, for KEDA and the pods (redis)."
    ),
    storage: str | None = typer.Option(None, help="Results storage every pod shares: s3://bucket/prefix."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
    simulated: Path | None = typer.Option(
        None, "--simulated", help="Scaling settings from `sdfleet simulate` (settings.yaml or chosen.yaml)."
    ),
) -> None:
    """Helm values for deploy/helm/sdfleet from the fleet file: per queue a worker and its KEDA trigger."""
    import yaml

    from sdfleet.deploy import apply_simulated, chart_values

    try:
        settings = load_settings(config)
        values = chart_values(
            settings.fleet,
            engine=engine,  # type: ignore[arg-type]  # checked by chart_values
            prefix=prefix,
            region=region,
            account=account,
            redis_address=redis_address,
            redis_password_secret=redis_password_secret,
            storage_url=storage,
            drain_s=settings.agent.drain_s,
        )
        if simulated is not None:
            values = apply_simulated(values, simulated)
    except SdfleetError as e:
        _fail(e)
        return
    text = yaml.safe_dump(values, sort_keys=False)
    if output is None:
        sys.stdout.write(text)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    queues = len(values["queues"])  # a worker Deployment and its ScaledObject each
    err.print(f"wrote {output}: {queues} queue{'s' if queues != 1 else ''}", highlight=False, markup=False)


@runtime_app.command("serve")
def runtime_serve(
    host: str = typer.Option("127.0.0.1", help="Listen address."),
    port: int = typer.Option(7860, min=0, max=65535, help="Listen port (SD WebUI's default)."),
    models_dir: Path | None = typer.Option(
        None, "--models-dir", "--dir", help="Models directory (default from settings)."
    ),
    model: str | None = typer.Option(
        None, help="Checkpoint to load at start (default: the configured one, else the first in the folder)."
    ),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    sdwebui_status: bool = typer.Option(
        False, help="Answer client mistakes with SD WebUI's own status codes (often 500) instead of 4xx."
    ),
    config: Path | None = ConfigOpt,
) -> None:
    """The diffusers runtime behind an AUTOMATIC1111-compatible API (/sdapi/v1/...)."""
    import uvicorn

    from sdfleet.build import runtime_options
    from sdfleet.models.catalog import ModelCatalog
    from sdfleet.runtime_server import create_app
    from sdfleet.runtimes import build_runtime

    settings = _settings(config)
    catalog = ModelCatalog(models_dir or settings.fleet.models.dir)
    # SD WebUI runs a prompt whose LoRA it lacks without it; the fleet's setting wins where set.
    options = {"missing_lora": "skip", **runtime_options(settings, "diffusers"), "device": device}
    model = model or settings.fleet.models.default
    try:
        runtime = build_runtime(
            "diffusers",
            catalog=catalog,
            options=options,
            default_model=model,
            cache_size=settings.fleet.models.cache_size,
        )
        if model:
            catalog.resolve(model)  # NotFound now, not in uvicorn's start-up
    except SdfleetError as e:
        _fail(e)
        return
    flags = {"port": str(port), "server_name": host, "listen": host not in ("127.0.0.1", "localhost")}
    app = create_app(
        runtime,
        catalog,
        model=model,
        cmd_flags=flags,
        sdwebui_status=sdwebui_status,
    )
    from sdfleet.serve import check_bindable

    check_bindable(host, port, "runtime server")
    uvicorn.run(app, host=host, port=port, log_config=None)


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
    print_table(table)


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
