"""The commands that talk to a running API (``--api``, ``SDFLEET_API_URL``): ``submit``, ``status``,
``cancel``, ``delete`` and ``tasks``. A mistake or an API error is one line and exit 2; ``submit
--wait`` exits 1 when the task did not succeed."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from sdfleet.cli_common import ApiOpt, JsonOpt, KeyOpt, _fail, console, err, print_json, print_table, when
from sdfleet.errors import SdfleetError

if TYPE_CHECKING:
    from sdfleet.client import AsyncClient

T = TypeVar("T")


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


def status(
    task_id: str, as_json: bool = JsonOpt, api_url: str = ApiOpt, api_key: str | None = KeyOpt
) -> None:
    """Show a task's state, progress, error and result links (--json: the whole task view)."""
    _show(_ask(api_url, api_key, lambda client: client.get(task_id)), as_json)


def cancel(
    task_id: str, as_json: bool = JsonOpt, api_url: str = ApiOpt, api_key: str | None = KeyOpt
) -> None:
    """Cancel a queued or running task (a running one is interrupted).

    Once the task has ended, exit 2 with the reason (HTTP 409).
    """
    _show(_ask(api_url, api_key, lambda client: client.cancel(task_id)), as_json)


def delete(task_id: str, api_url: str = ApiOpt, api_key: str | None = KeyOpt) -> None:
    """Delete a finished task now: its images, .out and thumbnails, then its record.

    While the task is queued or running, exit 2 with the reason: cancel it first.
    """
    _ask(api_url, api_key, lambda client: client.delete(task_id))
    console.print(f"deleted {task_id}")


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
