"""What the ``sdfleet`` commands share: consoles, common options, settings loading, failing cleanly."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from sdfleet.errors import NotFound, SdfleetError, Unauthorized, one_line
from sdfleet.settings import Settings, load_settings
from sdfleet.telemetry import setup_logging, setup_tracing

# soft_wrap: a line is never folded at the terminal's width, so a printed path or URL can be copied
# whole (the terminal wraps it on screen only) and reads back unbroken when piped.
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="Fleet file (default ./sdfleet.yaml if present).")
ApiOpt = typer.Option("http://127.0.0.1:8080", "--api", envvar="SDFLEET_API_URL", help="Base URL of the API.")
HostOpt = typer.Option(None, help="API host (SDFLEET_API__HOST).")
PortOpt = typer.Option(None, min=0, max=65535, help="API port (SDFLEET_API__PORT).")
JsonOpt = typer.Option(False, "--json", help="Print JSON (for scripts) instead of text.")
KeyOpt = typer.Option(
    None, "--api-key", envvar="SDFLEET_API_KEY", help="API key (when tenants are configured)."
)


def _settings(config: Path | None, *, service: str | None = None, **overrides: Any) -> Settings:
    settings = load_settings(config, **overrides)
    setup_logging(settings.log_level, settings.log_json)
    if service is not None:
        setup_tracing(service, settings.otlp_endpoint)
    return settings


def _fail(e: Exception) -> NoReturn:
    say_error(e)
    raise typer.Exit(2)


def fail_on_bus(e: SdfleetError) -> NoReturn:
    """``_fail`` for a command that reads the bus itself: a queue or topic the engine lacks is
    said with what to do about it."""
    if isinstance(e, NotFound):
        e = NotFound(f"{e}: create the fleet's queues with `sdfleet ensure` (or start `sdfleet up`)")
    _fail(e)


def say_error(e: BaseException) -> None:
    """``error: <what>`` on one line of stderr (a command's own failures, and ``cli.main``'s)."""
    err.print(f"[red]error:[/red] {escape(_one_line(e))}")  # messages may hold [brackets]: not markup


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename is not None else e.strerror
    if isinstance(e, json.JSONDecodeError):
        return f"not JSON: {e}"
    if isinstance(e, Unauthorized):  # the API's words name HTTP headers; a person gives a flag
        return f"{one_line(e)} (the CLI sends --api-key, or SDFLEET_API_KEY)"
    return one_line(e) or type(e).__name__


def when(epoch_s: float | None) -> str:
    """A timestamp for a person, the same in every command: ``2026-12-06 00:00:00 UTC``; ``-``
    for none."""
    if epoch_s is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch_s, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def print_json(data: Any) -> None:
    """One JSON document on stdout, plain (no colours, no folding), for scripts and ``jq``."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def print_table(table: Table, out: Console | None = None) -> None:
    """A table at its natural width, wider than the terminal if need be, so no cell is folded
    or cut ("…"): ids and figures in it can be copied whole."""
    out = out or console
    natural = Measurement.get(out, out.options.update_width(100_000), table).maximum
    width = out.width
    out.width = max(width, natural)  # print(width=) cannot go past the console's own width
    try:
        out.print(table)
    finally:
        out.width = width
