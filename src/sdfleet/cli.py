"""The ``sdfleet`` command line."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import ValidationError
from rich.table import Table

from sdfleet.cli_common import (
    ConfigOpt,
    HostOpt,
    JsonOpt,
    PortOpt,
    _fail,
    _settings,
    console,
    fail_on_bus,
    print_json,
    print_table,
    say_error,
)
from sdfleet.cli_dlq import dlq_app
from sdfleet.cli_ensure import ensure
from sdfleet.cli_keys import keys_app
from sdfleet.cli_simulate import simulate
from sdfleet.cli_tasks import cancel, delete, list_tasks, status, submit
from sdfleet.cli_tools import bench_app, deploy_app, models_app, runtime_app
from sdfleet.errors import SdfleetError, validation_errors
from sdfleet.settings import Settings

app = typer.Typer(
    help="sdfleet: asynchronous Stable Diffusion generation at scale.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"sdfleet {version('sdfleet')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    _version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


app.add_typer(models_app, name="models")
app.add_typer(runtime_app, name="runtime")
app.add_typer(deploy_app, name="deploy")
app.add_typer(bench_app, name="bench")
app.command("simulate")(simulate)
app.command()(ensure)
app.add_typer(keys_app, name="keys")
app.add_typer(dlq_app, name="dlq")


@app.command()
def demo(
    data_dir: Path = typer.Option(
        Path("sdfleet-demo"), help="Where the demo keeps its database, models, images."
    ),
    model: str | None = typer.Option(
        None, help="Run it on this model of the models folder (e.g. one `sdfleet models pull` fetched)."
    ),
    steps: int | None = typer.Option(None, help="With --model: steps (default: 2 for turbo, else 25)."),
    cfg: float | None = typer.Option(None, help="With --model: CFG scale (default 0 for turbo, else 7)."),
    size: int | None = typer.Option(None, help="With --model: width and height (default 512)."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="With --model: the fleet file naming the models folder."
    ),
) -> None:
    """The whole flow on this machine: API, topic, queues, agents, a tiny model, the seed's two requests."""
    from sdfleet.demo import OwnModel, run_demo

    own = None
    if model is None:
        flags = (("--steps", steps), ("--cfg", cfg), ("--size", size), ("-c", config))
        given = [flag for flag, value in flags if value is not None]
        if given:  # the demo's own fleet runs a tiny model: these would be ignored
            _fail(ValueError(f"{', '.join(given)}: only with --model"))
    else:
        models_dir = _settings(config).fleet.models.dir
        try:
            own = OwnModel(model, models_dir, steps=steps, size=512 if size is None else size, cfg_scale=cfg)
        except ValidationError as e:  # named by the flag given, not the task's field
            flag = {"steps": "--steps", "width": "--size", "cfg_scale": "--cfg"}
            _fail(ValueError(validation_errors(e, lambda loc: flag[str(loc[0])])))
    _writable_folder(data_dir, "--data-dir")
    try:
        asyncio.run(run_demo(data_dir, console, own))
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
    """The HTTP API alone (agents run elsewhere); SDFLEET_API__WORKERS processes on one port."""
    settings = _settings(config, service="sdfleet-api")
    _apply_listen(settings, host, port)
    if settings.api.workers > 1:
        from sdfleet.api.workers import serve

        try:
            serve(settings)
        except SdfleetError as e:
            _fail(e)
        return
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
    """A queue agent: receive tasks, run them on the runtime, store and publish their results.

    Side-car mode next to an SD WebUI container: --runtime a1111 --runtime-url http://127.0.0.1:7860
    """
    settings = _settings(config, service="sdfleet-agent")
    try:
        _apply_runtime(settings, queue, runtime, runtime_url)
    except SdfleetError as e:
        _fail(e)
    if ready_dir is not None:
        _writable_folder(ready_dir, "--ready-dir")
    _run_fleet(settings, [queue], with_api=False, burst=burst, ready_dir=ready_dir)


def _writable_folder(folder: Path, flag: str) -> None:
    """Made (with its parents) and writable now, or one error line: not after the runtime has
    loaded its model (minutes on a GPU worker) and the agent first writes there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        _fail(ValueError(f"{flag} {folder}: a file, not a folder"))
    except OSError as e:
        _fail(ValueError(f"{flag} {folder}: {e.strerror}"))
    if not os.access(folder, os.W_OK | os.X_OK):
        _fail(ValueError(f"{flag} {folder}: not writable"))


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
    if port is not None:  # 0 asks for a free port (uvicorn logs which); it was read as "not given"
        settings.api.port = port


def _run_fleet(settings: Settings, queues: list[str], **kwargs: Any) -> None:
    from sdfleet.serve import Fleet

    async def main() -> None:
        fleet = Fleet(settings, queues, **kwargs)
        fleet.install_signal_handlers()
        await fleet.run()

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(main())
    except SdfleetError as e:
        _fail(e)


def _loop_factory() -> Any:
    """uvloop when installed (uvicorn[standard] brings it): the API's per-request overhead is
    mostly the event loop's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# The commands that talk to a running API (cli_tasks.py), listed after those that start one.
app.command()(submit)
app.command()(status)
app.command()(cancel)
app.command()(delete)
app.command("tasks")(list_tasks)


@app.command()
def queues(config: Path | None = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """Depth of every configured queue, read from the bus itself (SQLite, SQS or Redis)."""
    from sdfleet.bus import open_bus

    settings = _settings(config)

    async def main() -> list[dict[str, Any]]:
        bus = open_bus(settings.bus)
        rows = []
        try:
            for q in settings.fleet.queues:
                s = await bus.stats(q.name)
                depth = {"visible": s.visible, "in_flight": s.in_flight, "delayed": s.delayed}
                age = {"oldest_age_s": s.oldest_age_s, "dead_letters": s.dead_letters}
                rows.append({"queue": q.name, "runtime": q.runtime, **depth, **age})
        finally:
            await bus.aclose()
        return rows

    try:
        rows = asyncio.run(main())
    except SdfleetError as e:
        fail_on_bus(e)
    if as_json:
        print_json(rows)
        return
    table = Table("queue", "runtime", "visible", "in flight", "delayed", "oldest age (s)", "dead letters")
    for r in rows:
        age = f"{r['oldest_age_s']:.1f}" if r["oldest_age_s"] is not None else "-"
        counts = (r["visible"], r["in_flight"], r["delayed"], age, r["dead_letters"])
        table.add_row(r["queue"], r["runtime"], *map(str, counts))
    print_table(table)


def main() -> None:
    # The CLI is the application: it may quiet the ML libraries' import-time advice and progress bars.
    for var, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ):
        os.environ.setdefault(var, value)
    try:
        # Not standalone: click's own mistakes (a flag's value out of range, an unknown option, a
        # missing argument) come here to be one line like the others, not typer's framed panel.
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # its click's errors (vendored: typer._click)
        if type(e).__name__ != "NoArgsIsHelpError":  # typer's own test; it printed the help
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
            say_error(ValueError(e.format_message().rstrip(".") + hint))
        raise SystemExit(getattr(e, "exit_code", 2)) from None
    except typer.Abort:
        raise SystemExit(1) from None
    except (SdfleetError, OSError, json.JSONDecodeError, yaml.YAMLError) as e:
        # What a person can fix (a fleet file, a setting, a path, a busy port) is one line, not a
        # traceback, from every command; a bug still shows its traceback.
        say_error(e)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)  # typer.Exit(n)'s n; a command's end: 0
