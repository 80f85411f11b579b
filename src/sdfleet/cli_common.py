"""What the ``sdfleet`` commands share: consoles, common options, settings loading, failing cleanly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from sdfleet.settings import Settings, load_settings
from sdfleet.telemetry import setup_logging, setup_tracing

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
    err.print(f"[red]error:[/red] {escape(str(e))}")  # messages may hold [brackets]: not markup
    raise typer.Exit(2)
