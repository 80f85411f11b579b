"""``sdfleet dlq list|redrive|drop``: the dead-letter queues' messages, running their tasks again,
deleting one nothing should run (``sdfleet.dlq`` says what a redrive does with each)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from sdfleet.cli_common import (
    ConfigOpt,
    JsonOpt,
    _fail,
    _settings,
    console,
    err,
    fail_on_bus,
    print_json,
    print_table,
)
from sdfleet.errors import SdfleetError, ValidationFailed
from sdfleet.settings import Settings

if TYPE_CHECKING:  # the commands import what they run: every sdfleet command starts without it
    from sdfleet.bus.base import Bus
    from sdfleet.dlq import DeadLetter, Letter, Read, Settled
    from sdfleet.store.base import TaskStore

    Act = Callable[[Bus, TaskStore, Settings, Letter], Awaitable[Settled]]

dlq_app = typer.Typer(help="Dead-letter queues: what they hold, and running it again.", no_args_is_help=True)
T = TypeVar("T")

QueuesArg = typer.Argument(None, help="Queues whose dead letters to read (default: every queue).")
LimitOpt = typer.Option(100, "--limit", min=1, max=10_000, help="Most letters read in one go.")


def _queues(settings: Settings, names: list[str] | None) -> list[str]:
    known = [q.name for q in settings.fleet.queues]
    unknown = [n for n in names or [] if n not in known]
    if unknown:  # a mistake in the arguments, not a queue the engine lacks
        raise ValidationFailed(
            f"no queue {', '.join(map(repr, unknown))} in the fleet (its queues: {', '.join(known)})"
        )
    return list(names) if names else known


def _run(config: Path | None, job: Callable[[Settings, Bus, TaskStore], Awaitable[T]]) -> T:
    """``job(settings, bus, store)`` on the fleet's engines; a bus or store error exits with its
    one line (the letters not settled yet go back to their dead-letter queue)."""
    from sdfleet.bus import open_bus
    from sdfleet.store import open_store

    settings = _settings(config)

    async def main() -> T:
        bus = open_bus(settings.bus)
        store = open_store(settings.store, retain_s=settings.fleet.retain_s)
        try:
            return await job(settings, bus, store)
        finally:
            await bus.aclose()
            await store.aclose()

    try:
        return asyncio.run(main())
    except SdfleetError as e:
        fail_on_bus(e)


def _error(letter: DeadLetter) -> str:
    if letter.unreadable:
        return letter.unreadable
    if letter.error:
        return f"{letter.error.code}: {letter.error.message}"
    return "-"


def _record(letter: DeadLetter) -> str:
    if letter.state is None:
        return "-" if letter.unreadable else "no record"
    later = f" (run {letter.record_run})" if letter.record_run != letter.run else ""
    return f"{letter.state}{later}"


@dlq_app.command("list")
def list_letters(
    queues: list[str] | None = QueuesArg,
    limit: int = LimitOpt,
    as_json: bool = JsonOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """The dead letters of the fleet's queues, with what their tasks' records say now.

    The letters are read, then given back: nothing is changed.
    """

    from sdfleet.dlq import held

    async def job(settings: Settings, bus: Bus, store: TaskStore) -> tuple[list[DeadLetter], dict[str, str]]:
        async with held(bus, store, _queues(settings, queues), limit=limit) as read:
            return [letter.view for letter in read.letters], read.skipped

    letters, skipped = _run(config, job)
    _say_skipped(skipped)
    if as_json:
        print_json([letter.model_dump(mode="json") for letter in letters])
        return
    if not letters:
        console.print("no dead letters")
        return
    table = Table("queue", "task", "tenant", "type", "run", "record", "last error")
    for d in letters:
        run = "-" if d.run is None else str(d.run)
        table.add_row(
            d.queue,
            d.task_id or d.message_id,
            d.tenant or "-",
            d.type or "-",
            run,
            _record(d),
            escape(_error(d)),
        )
    print_table(table)
    if len(letters) == limit:
        console.print(f"(the first {limit}: --limit to read more)")


IdsOpt = typer.Option(
    None, "--task", "--id", help="Only the letters of this task id or message id (repeatable)."
)


@dlq_app.command("redrive")
def redrive_letters(
    queues: list[str] | None = QueuesArg,
    ids: list[str] | None = IdsOpt,
    limit: int = LimitOpt,
    as_json: bool = JsonOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Run the dead letters' tasks again.

    A failed task's next run is published and its record reopened; a task still queued or running
    (or never recorded) is published as it was; a finished one's letter is dropped; a seed message
    or an unreadable one is kept. Exits 1 when a --task was not among the letters read or a letter
    was kept.
    """

    from sdfleet.dlq import redrive

    async def act(bus: Bus, store: TaskStore, settings: Settings, letter: Letter) -> Settled:
        return await redrive(bus, store, settings.fleet.tasks_topic, letter)

    _settle(config, queues, ids, limit, as_json, act, "redriving")


@dlq_app.command("drop")
def drop_letters(
    queues: list[str] | None = QueuesArg,
    ids: list[str] | None = IdsOpt,
    limit: int = LimitOpt,
    as_json: bool = JsonOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Delete the letters named with --id without running them.

    An --id is a task id, or the message id `list` shows for a body that is not a task. Exits 1
    when one was not among the letters read or could not be deleted.
    """
    if not ids:
        _fail(
            ValueError(
                "name the letters to drop with --id (a task id or a message id, see `sdfleet dlq list`)"
            )
        )

    from sdfleet.dlq import drop

    async def act(bus: Bus, store: TaskStore, settings: Settings, letter: Letter) -> Settled:
        return await drop(bus, letter)

    _settle(config, queues, ids, limit, as_json, act, "dropping")


def _settle(
    config: Path | None,
    queues: list[str] | None,
    ids: list[str] | None,
    limit: int,
    as_json: bool,
    act: Act,
    verb: str,
) -> None:
    """``act`` on the letters read (those ``ids`` name, if any), then the report; exits 1 when an
    id was not among the letters read or a letter was kept (a redrive's rule, or an error)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from sdfleet.dlq import Outcome, held, settle

    wanted = set(ids or [])

    async def job(
        settings: Settings, bus: Bus, store: TaskStore
    ) -> tuple[list[Settled], Read, dict[str, int]]:
        names = _queues(settings, queues)
        done: list[Settled] = []
        async with held(bus, store, names, limit=limit) as read:
            chosen = [x for x in read.letters if not wanted or wanted & {x.view.task_id, x.view.message_id}]
            columns = (TextColumn(verb), BarColumn(), MofNCompleteColumn())
            with Progress(*columns, console=err, transient=True, disable=as_json or len(chosen) < 2) as bar:
                for letter in bar.track(chosen):
                    done.append(await settle(letter, lambda x: act(bus, store, settings, x)))
        left = {name: (await bus.stats(name)).dead_letters for name in names if name not in read.skipped}
        return done, read, left

    done, read, left = _run(config, job)
    missing = sorted(wanted - {r.letter.task_id for r in done} - {r.letter.message_id for r in done})
    if as_json:
        settled = [r.model_dump(mode="json") for r in done]
        print_json({"settled": settled, "missing": missing, "left": left, "skipped": read.skipped})
    else:
        _say_skipped(read.skipped)
        _print_settled(done, missing, left)
    if missing or any(r.outcome is Outcome.KEPT for r in done):
        raise typer.Exit(1)


def _say_skipped(skipped: dict[str, str]) -> None:
    for queue, why in skipped.items():
        err.print(f"queue {escape(queue)} not read: {escape(why)}")  # stdout stays the letters


def _print_settled(done: list[Settled], missing: list[str], left: dict[str, int]) -> None:
    if done:
        table = Table("queue", "task", "outcome", "run", "why")
        for r in done:
            run = "-" if r.run is None else str(r.run)
            table.add_row(
                r.letter.queue,
                r.letter.task_id or r.letter.message_id,
                r.outcome.value,
                run,
                escape(r.reason),
            )
        print_table(table)
    else:
        console.print("no dead letters")
    for name in missing:
        console.print(f"{escape(name)}: not among the dead letters read")
    remaining = ", ".join(f"{q} {n}" for q, n in left.items() if n)
    if remaining:
        console.print(f"still in the dead-letter queues: {remaining}")
