"""The ``sdfleet`` command line."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
import yaml
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from sdfleet.cli_common import (
    ApiOpt,
    ConfigOpt,
    HostOpt,
    JsonOpt,
    KeyOpt,
    PortOpt,
    _fail,
    _settings,
    console,
    err,
    fail_on_bus,
    print_json,
    print_table,
    say_error,
    when,
)
from sdfleet.cli_dlq import dlq_app
from sdfleet.cli_ensure import ensure
from sdfleet.cli_keys import keys_app
from sdfleet.cli_simulate import simulate
from sdfleet.cli_tools import bench_app, deploy_app, models_app, runtime_app
from sdfleet.errors import SdfleetError, validation_errors
from sdfleet.settings import Settings

if TYPE_CHECKING:
    from sdfleet.client import AsyncClient

T = TypeVar("T")

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


@app.command()
def submit(
    ctx: typer.Context,
    prompt: str | None = typer.Option(None, help="Prompt of a text-to-image task."),
    file: Path | None = typer.Option(None, "--file", "-f", help="JSON body to send ('-' for stdin)."),
    fmt: str = typer.Option("v1", "--format", help="Body format of --file: v1, v1alpha1 or v1alpha2."),
    model: str | None = typer.Option(None, help="Model (checkpoint) name (default: the fleet's default)."),
    negative_prompt: str | None = typer.Option(
        None, "--negative-prompt", help="What the image should not show."
    ),
    steps: int = typer.Option(20, help="Denoising steps (1-150)."),
    width: int = typer.Option(512, help="Width in pixels, a multiple of 8."),
    height: int = typer.Option(512, help="Height in pixels, a multiple of 8."),
    cfg: float | None = typer.Option(None, "--cfg", help="CFG scale, 0-30 (default 7)."),
    sampler: str | None = typer.Option(
        None, help="Sampler, by SD WebUI's name (e.g. 'Euler a', 'DPM++ 2M')."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Images of this prompt, 1-64; 16 at most on a diffusers queue (default 1)."
    ),
    seed: int = typer.Option(-1, help="Seed of the first image (-1: a random one)."),
    priority: int = typer.Option(0, help="0-9, higher runs sooner (routed by priority lanes' filters)."),
    output_format: str | None = typer.Option(
        None, "--output-format", help="png, jpeg or webp: the format the images are stored in."
    ),
    ttl: float | None = typer.Option(
        None, "--ttl", help="Seconds within which it must start, or it fails unrun (default: the queue's)."
    ),
    webhook: str | None = typer.Option(
        None, "--webhook", help="URL POSTed (signed) when the task succeeds, fails or is cancelled."
    ),
    wait: bool = typer.Option(False, help="Wait for the task to finish (a progress bar on a terminal)."),
    as_json: bool = JsonOpt,
    api_url: str = ApiOpt,
    api_key: str | None = KeyOpt,
) -> None:
    """Submit a task; prints its id (and, with --wait, where its images are). --json: the task view."""
    from sdfleet.client import AsyncClient, wait_with_progress

    if file is not None and prompt is not None:
        _fail(ValueError("give --prompt or --file, not both (a --file body carries its own prompt)"))
    if file is not None and (ignored := _body_flags_given(ctx)):
        _fail(ValueError(f"{', '.join(ignored)}: a --file body carries its own parameters; set them there"))
    if file is not None:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
        body = json.loads(text)
    elif prompt is not None:
        params = {"prompt": prompt, "steps": steps, "width": width, "height": height, "seed": seed}
        given = _without_none(
            params,
            negative_prompt=negative_prompt,
            cfg_scale=cfg,
            sampler=sampler,
            batch_size=batch_size,
            output_format=output_format,
        )
        hook = {"url": webhook} if webhook is not None else None
        body = _without_none({"model": model, "params": given, "priority": priority}, ttl_s=ttl, webhook=hook)
    else:
        _fail(ValueError("give --prompt or --file"))

    submitted: list[str] = []

    async def main() -> dict[str, Any]:
        async with AsyncClient(api_url, api_key=api_key) as client:
            task_id = await client.submit_raw(body, fmt=fmt)
            submitted.append(task_id)
            if as_json:
                return await (client.wait(task_id) if wait else client.get(task_id))
            console.print(f"submitted [bold]{task_id}[/bold]")
            if not wait:
                return {}
            view = await wait_with_progress(client, task_id, console)
            _print_view(view)
            return view

    view = _submitting(main(), submitted)
    if as_json:
        print_json(view)
    if wait and view["state"] != "succeeded":
        raise typer.Exit(1)


_BODY_FLAGS = frozenset(
    ("model", "negative_prompt", "steps", "width", "height", "cfg", "sampler", "batch_size", "seed",
     "priority", "output_format", "ttl", "webhook")
)  # fmt: skip
"""``submit``'s options that make the body ``--prompt`` sends (a ``--file`` body has its own)."""


def _body_flags_given(ctx: typer.Context) -> list[str]:
    """The body's options given on the command line (not left at their defaults): with ``--file``
    they would be dropped without a word."""
    return [
        param.opts[0]
        for param in ctx.command.params
        if param.name in _BODY_FLAGS
        and (source := ctx.get_parameter_source(param.name)) is not None
        and source.name not in ("DEFAULT", "DEFAULT_MAP")
    ]


def _submitting(main: Coroutine[Any, Any, dict[str, Any]], submitted: list[str]) -> dict[str, Any]:
    """Run ``submit``'s client; Ctrl-C stops the waiting, not the task, and names it (with --json
    its id was not printed yet)."""
    try:
        return asyncio.run(main)
    except SdfleetError as e:
        _fail(e)
    except KeyboardInterrupt:
        if submitted:
            task_id = submitted[0]
            err.print(
                f"stopped waiting; task {task_id} goes on: `sdfleet status {task_id}` shows it, "
                f"`sdfleet cancel {task_id}` stops it",
                highlight=False,
                markup=False,
            )
        raise typer.Exit(130) from None


def _without_none(params: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """``params`` with the ``optional`` ones that were given (the API's defaults for the rest)."""
    return params | {k: v for k, v in optional.items() if v is not None}


def _print_view(view: dict[str, Any]) -> None:
    """A task for a person: its state (with progress while it runs), error, then one line per image
    with its key and link, never folded."""
    state = view["state"]
    running = f" {view['progress']:.0%}" if state == "running" else ""
    model = f" · model {view['model']}" if view.get("model") else ""
    run = f" · run {view['run']}" if view.get("run", 1) > 1 else ""  # run again (redrive, seed resubmit)
    priority = f" · priority {view['priority']}" if view.get("priority") else ""
    head = f"{view['id']}: [bold]{state}[/bold]{running} · queue {view.get('queue')}{model}{priority}{run}"
    console.print(head)
    if view.get("error"):
        error = f"{view['error']['code']}: {escape(view['error']['message'])}"
        if state in ("queued", "running"):  # a failed attempt's reason, not the task's end
            console.print(f"  last try failed: {error} (it is tried again)")
        else:
            console.print(f"  error: {error}")
    for image in view.get("images", []):
        console.print(f"  {image['key']}  {image['url']}", highlight=False)
    if state == "queued" and view.get("ttl_s") and view.get("run", 1) == 1:  # a later run: its own submit
        console.print(f"  starts by {when(view['created_at'] + view['ttl_s'])} or fails unrun (ttl_s)")
    if view.get("expires_at"):  # the fleet's retain_days: then the record (and local files) go
        console.print(f"  kept until {when(view['expires_at'])}")


@app.command()
def status(
    task_id: str, as_json: bool = JsonOpt, api_url: str = ApiOpt, api_key: str | None = KeyOpt
) -> None:
    """Show a task's state, progress, error and result links (--json: the whole task view)."""
    _show(_ask(api_url, api_key, lambda client: client.get(task_id)), as_json)


@app.command()
def cancel(
    task_id: str, as_json: bool = JsonOpt, api_url: str = ApiOpt, api_key: str | None = KeyOpt
) -> None:
    """Cancel a queued or running task (a running one is interrupted).

    Once the task has ended, exit 2 with the reason (HTTP 409).
    """
    _show(_ask(api_url, api_key, lambda client: client.cancel(task_id)), as_json)


@app.command()
def delete(task_id: str, api_url: str = ApiOpt, api_key: str | None = KeyOpt) -> None:
    """Delete a finished task now: its images, .out and thumbnails, then its record.

    While the task is queued or running, exit 2 with the reason: cancel it first.
    """
    _ask(api_url, api_key, lambda client: client.delete(task_id))
    console.print(f"deleted {task_id}")


@app.command("tasks")
def list_tasks(
    state: str | None = typer.Option(None, "--state", help="Only tasks in this state (queued, running…)."),
    limit: int = typer.Option(20, "--limit", min=1, max=10_000, help="At most this many, newest first."),
    as_json: bool = JsonOpt,
    api_url: str = ApiOpt,
    api_key: str | None = KeyOpt,
) -> None:
    """Your tasks, newest first: id, state, run, model, queue, images, created, kept until."""
    tasks = _ask(api_url, api_key, lambda client: client.list(state=state, limit=limit))
    if as_json:
        print_json(tasks)
        return
    if not tasks:  # an empty frame says less than a line
        console.print(f"no {state} tasks" if state else "no tasks", highlight=False)
        return
    table = Table("id", "state", "run", "model", "queue", "images", "created", "kept until")
    for t in tasks:
        kept = when(t.get("expires_at"))
        cells = (t["state"], str(t["run"]), t["model"] or "-", t["queue"] or "-", str(len(t["images"])))
        table.add_row(t["id"], *cells, when(t["created_at"]), kept)
    print_table(table)


def _ask(api_url: str, api_key: str | None, call: Callable[[AsyncClient], Awaitable[T]]) -> T:
    """``call`` on a client of the API; an error is one line and exit 2."""
    from sdfleet.client import AsyncClient

    async def main() -> T:
        async with AsyncClient(api_url, api_key=api_key) as client:
            return await call(client)

    try:
        return asyncio.run(main())
    except SdfleetError as e:
        _fail(e)


def _show(view: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(view)
    else:
        _print_view(view)


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
