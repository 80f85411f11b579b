"""``sdfleet models push|pull|sync|ls``: models between the models folder and S3 or the Hugging Face Hub."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.table import Table

from sdfleet.cli_common import ConfigOpt, _fail, _settings, console, print_json, print_table
from sdfleet.errors import ConfigError, SdfleetError
from sdfleet.settings import ModelsConfig

T = TypeVar("T")
DirOpt = typer.Option(None, "--dir", help="Models directory (default: models.dir).")
JobsOpt = typer.Option(
    None, "--jobs", "-j", min=1, max=64, help="Parts in flight at once (default: models.transfer_jobs)."
)
JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts instead of tables and bars.")
S3_HELP = "s3://bucket/prefix (default: models.s3)."


def add_transfer_commands(app: typer.Typer) -> None:
    app.command("push")(push)
    app.command("pull")(pull)
    app.command("sync")(sync)
    app.command("ls")(ls)


def _models(config: Path | None) -> ModelsConfig:
    return _settings(config).fleet.models


def _remote(url: str | None, models: ModelsConfig) -> str:
    found = url or models.s3
    if not found:
        raise ConfigError(
            "no S3 location: give --s3 s3://bucket/prefix or set models.s3 (SDFLEET_FLEET__MODELS__S3)"
        )
    return found


def _run(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; errors and Ctrl-C end the command cleanly (transfers resume on a rerun)."""
    try:
        return asyncio.run(make())
    except SdfleetError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("interrupted: run the same command again to resume where it stopped")
        raise typer.Exit(130) from None
    raise AssertionError("unreachable")


def _sync_tool(root: Path, url: str, models: ModelsConfig, jobs: int | None, bars: Any) -> Any:
    from sdfleet.models.remote import ModelBucket
    from sdfleet.models.sync import ModelSync

    n = jobs if jobs is not None else models.transfer_jobs
    return ModelSync(root, ModelBucket(url, jobs=n), bars, part_size=models.part_size_mb * 2**20, jobs=n)


def _bars(as_json: bool, title: str) -> Any:
    from sdfleet.models.bars import ConsoleBars
    from sdfleet.models.progress import Silent

    return Silent() if as_json else ConsoleBars(console, 0, title)


def pull(
    names: list[str] = typer.Argument(..., help="Model names in S3, or hf:<owner>/<repo>[@revision]."),
    source: str | None = typer.Option(None, "--s3", "--from", help=S3_HELP),
    models_dir: Path | None = DirOpt,
    name: str | None = typer.Option(None, "--name", help="Folder name of an hf: model (default: repo name)."),
    variant: str = typer.Option("fp16", help="hf: weights variant to prefer ('none': full precision)."),
    jobs: int | None = JobsOpt,
    as_json: bool = JsonOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Download models into the models folder: resumable, verified, never half visible."""
    models = _models(config)
    root = models_dir or models.dir
    results: list[dict[str, Any]] = []
    for spec in names:
        if spec.startswith("hf:"):
            results.append(_pull_hub(root, spec, name, None if variant == "none" else variant, as_json))
        else:
            results.append(_pull_s3(root, spec, source, models, jobs, as_json))
    if as_json:
        print_json(results)


def _pull_s3(
    root: Path, spec: str, source: str | None, models: ModelsConfig, jobs: int | None, as_json: bool
) -> dict[str, Any]:
    from sdfleet.models.sync import mib

    async def go() -> Any:
        with _bars(as_json, f"pull {spec}") as bars:
            tool = _sync_tool(root, _remote(source, models), models, jobs, bars)
            try:
                return await tool.pull(spec)
            finally:
                tool.bucket.close()

    r = _run(go)
    if not as_json:
        if r.files == 0:
            console.print(f"{r.name} is up to date in {root}", soft_wrap=True)
        else:
            rate = r.fetched / r.seconds / 2**20 if r.seconds > 0 else 0.0
            files = f"{r.files} file{'s' if r.files != 1 else ''}"
            line = f"pulled {r.name}: {files}, {mib(r.fetched)} in {r.seconds:.1f} s ({rate:.1f} MiB/s)"
            console.print(line + (f", waited {r.waited_s:.1f} s for another pull" if r.waited_s > 1 else ""))
    return {
        "name": r.name,
        "source": "s3",
        "files": r.files,
        "fetched_bytes": r.fetched,
        "waited_s": round(r.waited_s, 3),
        "seconds": round(r.seconds, 3),
    }


def _pull_hub(root: Path, spec: str, name: str | None, variant: str | None, as_json: bool) -> dict[str, Any]:
    from sdfleet.models.hub import HubPull
    from sdfleet.models.sync import mib

    try:
        r = HubPull(root, spec, name=name, variant=variant, bars=not as_json).run()
    except SdfleetError as e:
        _fail(e)
        raise
    if not as_json:
        what = (
            "is up to date"
            if r.up_to_date
            else f"pulled: {r.files} files, {mib(r.size)} in {r.seconds:.1f} s"
        )
        console.print(f"{r.name} ({r.repo}@{r.commit[:12]}) {what}", soft_wrap=True)
        console.print(f"  {r.path}", soft_wrap=True, highlight=False)
    return {
        "name": r.name,
        "source": "hf",
        "repo": r.repo,
        "commit": r.commit,
        "files": r.files,
        "bytes": r.size,
        "path": str(r.path),
        "up_to_date": r.up_to_date,
    }


def push(
    paths: list[Path] = typer.Argument(..., help="Model files or folders (or names in the models folder)."),
    to: str | None = typer.Option(None, "--s3", "--to", help=S3_HELP),
    models_dir: Path | None = DirOpt,
    jobs: int | None = JobsOpt,
    as_json: bool = JsonOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Upload models: multipart, parallel, resumable; each object carries its SHA-256."""
    from sdfleet.models.sync import mib

    models = _models(config)
    root = models_dir or models.dir
    sources = [p if p.exists() else root / p for p in paths]
    if missing := [str(p) for p, src in zip(paths, sources, strict=True) if not src.exists()]:
        _fail(ConfigError(f"no such model file or folder, here or in {root}: {', '.join(missing)}"))

    async def go() -> int:
        with _bars(as_json, "push") as bars:
            tool = _sync_tool(root, _remote(to, models), models, jobs, bars)
            try:
                return sum([await tool.push(src) for src in sources])
            finally:
                tool.bucket.close()

    sent = _run(go)
    if as_json:
        print_json({"models": [str(src) for src in sources], "sent_bytes": sent})
        return
    console.print(f"pushed {len(sources)} model(s), {mib(sent)} sent", soft_wrap=True)


def sync(
    remote: str | None = typer.Option(None, "--s3", "--remote", help=S3_HELP),
    direction: str = typer.Option("both", help="both, up (push only) or down (pull only)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would move; move nothing."),
    models_dir: Path | None = DirOpt,
    jobs: int | None = JobsOpt,
    as_json: bool = JsonOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Make the models folder and S3 hold the same models, by size and checksum, both ways."""
    from sdfleet.models.sync import mib

    if direction not in ("both", "up", "down"):
        _fail(ConfigError(f"--direction must be both, up or down, not {direction!r}"))
    models = _models(config)
    root = models_dir or models.dir

    async def go() -> tuple[list[Any], int, int]:
        tool = _sync_tool(root, _remote(remote, models), models, jobs, _bars(True, ""))
        try:
            actions = await tool.plan(direction)
            if not as_json:
                _print_plan(actions)
            if dry_run or not actions:
                return actions, 0, 0
            with _bars(as_json, "sync") as bars:
                tool.transfers.progress = bars
                fetched, sent = await tool.apply(actions)
            return actions, fetched, sent
        finally:
            tool.bucket.close()

    actions, fetched, sent = _run(go)
    count = len(actions)
    if as_json:
        moves = [
            {"op": a.op, "model": a.model, "path": a.path, "bytes": a.size, "why": a.reason} for a in actions
        ]
        print_json({"dry_run": dry_run, "files": moves, "fetched_bytes": fetched, "sent_bytes": sent})
        return
    if dry_run:
        console.print(f"dry run: {count} file(s) would move")
    else:
        console.print(f"synced: {count} file(s), {mib(fetched)} pulled, {mib(sent)} pushed")


def _print_plan(actions: list[Any]) -> None:
    """One row per model and way: how many files, how many bytes, and why."""
    from sdfleet.models.sync import mib

    if not actions:
        console.print("in sync: nothing to move")
        return
    rows: dict[tuple[str, str], list[Any]] = {}
    for a in actions:
        rows.setdefault((a.model, a.op), []).append(a)
    table = Table("op", "model", "files", "size", "why")
    for (model, op), group in rows.items():
        reasons = ", ".join(sorted({a.reason for a in group}))
        table.add_row(op, model, str(len(group)), mib(sum(a.size for a in group)), reasons)
    print_table(table)


def ls(
    remote: bool = typer.Option(False, "--remote", help="List the models in S3 instead of the folder."),
    url: str | None = typer.Option(None, "--s3", help=S3_HELP),
    models_dir: Path | None = DirOpt,
    as_json: bool = JsonOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Models with their size and file count, in the models folder or (--remote) in S3."""
    from sdfleet.models.catalog import HOW_TO_ADD, folder_named
    from sdfleet.models.layout import local_models
    from sdfleet.models.sync import mib

    models = _models(config)
    if remote:

        async def go() -> Any:
            root = models_dir or models.dir
            tool = _sync_tool(root, _remote(url, models), models, None, _bars(True, ""))
            try:
                return {name: files for name, (files, _) in (await tool.remote()).items()}
            finally:
                tool.bucket.close()

        found = _run(go)
        where = _remote(url, models)
    else:
        where = folder_named(models_dir or models.dir)
        found = local_models(models_dir or models.dir)
    rows = [{"name": m.name, "kind": m.kind, "files": len(m.files), "bytes": m.size} for m in found.values()]
    if as_json:
        print_json(rows)
        return
    if not rows:
        how = "" if remote else f": {HOW_TO_ADD}"
        console.print(f"no models in {where}{how}", highlight=False, markup=False)
        return
    table = Table("name", "kind", "files", "size", title=where)
    for row in rows:
        table.add_row(row["name"], row["kind"], str(row["files"]), mib(row["bytes"]))
    print_table(table)
