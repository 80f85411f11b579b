"""``sdfleet keys create|list|revoke``: API keys kept as data in the task store's engine.

A key is shown once, when it is created; the store keeps its SHA-256 and what it grants (tenant,
tier, limits). Every API replica sees a new or revoked key within ``api.key_cache_s`` seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import typer
from pydantic import ValidationError
from rich.table import Table

from sdfleet.cli_common import ConfigOpt, _fail, _settings, console, print_json, print_table, when
from sdfleet.errors import SdfleetError, validation_errors
from sdfleet.store.access import AccessStore, ApiKey, digest, new_key, open_access
from sdfleet.tasks import PRIORITY_MAX

keys_app = typer.Typer(help="API keys stored (hashed) in the task store's engine.", no_args_is_help=True)
T = TypeVar("T")


def _with_access(config: Path | None, job: Callable[[AccessStore], Awaitable[T]]) -> T:
    settings = _settings(config)

    async def main() -> T:
        access = open_access(settings.store)
        try:
            return await job(access)
        finally:
            await access.aclose()

    try:
        return asyncio.run(main())
    except SdfleetError as e:
        _fail(e)
        raise  # not reached: _fail exits


KEY_FLAGS = {
    "tenant": "--tenant",
    "tier": "--tier",
    "rate_limit": "--rate",
    "burst": "--burst",
    "max_in_flight": "--max-in-flight",
    "max_priority": "--max-priority",
}
"""``ApiKey``'s fields by the flag that sets each, for its errors."""


@keys_app.command("create")
def create(
    tenant: str = typer.Option(..., "--tenant", help="Tenant the key acts for."),
    tier: str = typer.Option("standard", help="The tenant_tier routing attribute of its tasks."),
    rate: float | None = typer.Option(None, "--rate", help="Accepted submissions per second (all replicas)."),
    burst: int | None = typer.Option(
        None, help="Submissions accepted at once (default: one second's worth)."
    ),
    max_in_flight: int | None = typer.Option(None, "--max-in-flight", help="Most queued plus running tasks."),
    max_priority: int = typer.Option(
        PRIORITY_MAX, "--max-priority", help="Highest task priority it may ask for."
    ),
    as_json: bool = typer.Option(False, "--json", help="The key and its settings as one JSON object."),
    config: Path | None = ConfigOpt,
) -> None:
    """Create a key; it is printed once (only its hash is stored)."""
    secret, key_id = new_key()
    try:
        key = ApiKey(
            id=key_id,
            digest=digest(secret),
            tenant=tenant,
            tier=tier,
            rate_limit=rate,
            burst=burst,
            max_in_flight=max_in_flight,
            max_priority=max_priority,
        )
    except ValidationError as e:
        _fail(ValueError(validation_errors(e, lambda loc: KEY_FLAGS.get(str(loc[0]), str(loc[0])))))
        return
    _with_access(config, lambda access: access.add_key(key))
    if as_json:
        print_json({"key": secret, **key.model_dump(mode="json", exclude={"digest"})})
        return
    console.print(f"key [bold]{key.id}[/bold] for tenant [bold]{tenant}[/bold] (shown once, keep it):")
    print(secret)


@keys_app.command("list")
def list_keys(
    config: Path | None = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="The keys as one JSON array (no hashes)."),
) -> None:
    """Stored keys, revoked ones included (keys in sdfleet.yaml are not listed)."""
    keys = _with_access(config, lambda access: access.keys())
    if as_json:
        print_json([k.model_dump(mode="json", exclude={"digest"}) for k in keys])
        return
    if not keys:
        console.print("no stored keys (`sdfleet keys create --tenant T` makes one)", highlight=False)
        return
    table = Table(
        "id", "tenant", "tier", "rate/s", "burst", "max in flight", "max priority", "created", "revoked"
    )
    for k in keys:
        limits = (k.rate_limit, k.burst, k.max_in_flight, k.max_priority)
        cells = ["-" if v is None else f"{v:g}" for v in limits]
        table.add_row(k.id, k.tenant, k.tier, *cells, when(k.created_at), when(k.revoked_at))
    print_table(table)


@keys_app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., help="The key's id (from create or list)."),
    config: Path | None = ConfigOpt,
) -> None:
    """Revoke a key: every API replica refuses it within api.key_cache_s seconds."""
    key = _with_access(config, lambda access: access.revoke(key_id))
    if key is None:
        _fail(ValueError(f"no key with id {key_id!r}"))
        return
    console.print(f"key {key.id} of tenant {key.tenant} revoked at {when(key.revoked_at)}")
