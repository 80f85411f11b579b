"""Models between a models folder and an S3 prefix: pull, push, and the plan of a two-way sync.

A pull downloads into ``<models>/.sdfleet/partial/<name>/`` and moves each verified file to its
final name, the file that makes the model visible last (``layout.visible_last``): an interrupted
or failed pull never leaves half a model where the catalog would find it. A pull holds the
model's download lock, so concurrent pulls of one model on one node download it once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sdfleet.errors import DiskFull, NotFound
from sdfleet.models.catalog import match_name
from sdfleet.models.layout import STATE_DIR, ChecksumCache, ModelFiles, local_models, visible_last
from sdfleet.models.locks import exclusive, lock_path
from sdfleet.models.progress import Progress
from sdfleet.models.remote import Checksum, ModelBucket, RemoteFile
from sdfleet.models.transfer import MIB, Transfers, all_or_first_error

Direction = Literal["both", "up", "down"]
RemoteModels = dict[str, tuple[ModelFiles, dict[str, RemoteFile]]]
MakeRoom = Callable[[str, int], Awaitable[None]]


@dataclass(frozen=True)
class Action:
    """One file of a sync plan."""

    op: Literal["pull", "push"]
    model: str
    path: str
    size: int
    reason: str


@dataclass(frozen=True)
class PullResult:
    name: str
    fetched: int
    """Bytes that came over the network (resumed bytes excluded; 0 when it was up to date)."""
    files: int
    """Files downloaded."""
    waited_s: float
    """Time spent waiting while another process or agent downloaded it."""
    seconds: float


def mib(n: int) -> str:
    """A size for people: ``512 B``, ``3.4 KiB``, ``38.1 MiB``, ``2.4 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", MIB), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


class ModelSync:
    """Pull, push and sync the models of ``root`` against ``bucket``."""

    def __init__(
        self, root: Path, bucket: ModelBucket, progress: Progress, *, part_size: int, jobs: int
    ) -> None:
        self.root = root
        self.bucket = bucket
        self.cache = ChecksumCache(root)
        self.transfers = Transfers(bucket, progress, part_size=part_size, jobs=jobs)
        self._remote: RemoteModels | None = None

    async def remote(self, *, refresh: bool = False) -> RemoteModels:
        if self._remote is None or refresh:
            self._remote = await self.bucket.list_models()
        return self._remote

    async def remote_name(self, name: str) -> str:
        """The remote model ``name`` asks for (exact, or by stem); ``NotFound`` listing what there is."""
        remote = await self.remote()
        found = match_name(name, list(remote))
        if found is None:
            have = ", ".join(remote) or "none"
            raise NotFound(f"model {name!r} is not in {self.bucket.url} (there: {have})")
        return found

    async def pull(self, name: str, make_room: MakeRoom | None = None) -> PullResult:
        """Make the local copy of remote model ``name`` equal to S3's; waits for a concurrent pull.

        ``make_room(name, bytes)`` runs under the model's lock before anything is downloaded."""
        started = time.monotonic()
        found = await self.remote_name(name)
        async with exclusive(lock_path(self.root, found)) as waited:
            files, listing = (await self.remote(refresh=waited > 0))[found]
            todo = [p for p in files.files if await self._differs(p, listing[p])]
            if todo and make_room is not None:
                await make_room(found, sum(listing[p].size for p in todo))
            fetched = await self.download(found, {p: listing[p] for p in todo})
        return PullResult(found, fetched, len(todo), waited, time.monotonic() - started)

    async def download(self, name: str, files: dict[str, RemoteFile]) -> int:
        """Download ``files`` of model ``name`` and move them into place; the bytes fetched.

        The caller holds the model's download lock."""
        if not files:
            return 0
        staging = self.root / STATE_DIR / "partial" / name
        self._check_space(name, files, staging)
        checksums = await asyncio.gather(*(self._checksum(p) for p in files))
        fetched = 0

        async def one(path: str, checksum: Checksum) -> None:
            nonlocal fetched
            got = await self.transfers.download(files[path], staging / path, checksum)
            fetched += got

        await all_or_first_error(one(p, c) for p, c in zip(files, checksums, strict=True))
        verified = {p: c.sha256 for p, c in zip(files, checksums, strict=True) if c.sha256}
        for path in visible_last(name, files):
            final = self.root / path
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / path, final)
            if path in verified:  # checked on download; a rename keeps size and mtime
                self.cache.remember(path, verified[path])
        shutil.rmtree(staging, ignore_errors=True)
        return fetched

    async def _checksum(self, path: str) -> Checksum:
        checksum: Checksum = await self.bucket.aws.run(lambda: self.bucket.checksum_blocking(path))
        return checksum

    def _check_space(self, name: str, files: dict[str, RemoteFile], staging: Path) -> None:
        needed = sum(f.size for f in files.values())
        if staging.is_dir():  # space already reserved by an interrupted pull
            needed -= sum(p.stat().st_size for p in staging.rglob("*.part") if p.is_file())
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if needed > free:
            raise DiskFull(
                f"model {name} needs {mib(needed)} more on disk, {mib(free)} free in {self.root}; "
                "nothing was written under its name"
            )

    async def _differs(self, path: str, remote: RemoteFile) -> bool:
        local = self.root / path
        if not local.is_file() or local.stat().st_size != remote.size:
            return True
        checksum = await self._checksum(path)
        if checksum.sha256:
            return await asyncio.to_thread(self.cache.sha256, path) != checksum.sha256
        if checksum.md5:
            return await asyncio.to_thread(_md5, local) != checksum.md5
        return False  # same size and nothing to compare with

    async def push(self, src: Path) -> int:
        """Upload model ``src`` (a file or a diffusers folder) under its name; the bytes sent."""
        files = _model_files(src)
        if not files:
            raise NotFound(
                f"{src} is not a model (a .safetensors/.ckpt file or a folder with model_index.json)"
            )
        listing = (await self.remote(refresh=True)).get(src.name, (None, {}))[1]
        inside = src.parent.resolve() == self.root.resolve()
        cache = self.cache if inside else ChecksumCache(src.parent, persist=False)
        todo = []
        for rel in files:
            sha = await asyncio.to_thread(cache.sha256, rel)
            if rel not in listing or await self._remote_differs(rel, listing[rel], sha):
                todo.append((rel, sha))
        return await self.upload(src.parent, src.name, todo)

    async def upload(self, base: Path, name: str, todo: list[tuple[str, str]]) -> int:
        """Upload ``(path, sha256)`` pairs of model ``name`` from ``base``, visible-last file last."""
        state_dir = self.root / STATE_DIR / "uploads"
        order = visible_last(name, [rel for rel, _ in todo])
        sha = dict(todo)
        sent = 0

        async def one(rel: str) -> None:
            nonlocal sent
            done = await self.transfers.upload(base / rel, rel, sha[rel], state_dir)
            sent += done

        await all_or_first_error(one(rel) for rel in order[:-1])
        if order:
            await one(order[-1])
        self._remote = None
        return sent

    async def _remote_differs(self, rel: str, remote: RemoteFile, sha: str) -> bool:
        checksum = await self._checksum(rel)
        return (
            remote.size != (self.root / rel).stat().st_size if not checksum.known else checksum.sha256 != sha
        )

    async def plan(self, direction: Direction = "both") -> list[Action]:
        """What ``sync`` would move: files missing on one side, and files that differ (by size, then
        checksum) going the way of the newer copy, unless ``direction`` says which way."""
        local = await asyncio.to_thread(local_models, self.root)
        remote = await self.remote(refresh=True)
        actions: list[Action] = []
        for name in sorted(set(local) | set(remote)):
            here = local[name].files if name in local else {}
            there = remote[name][1] if name in remote else {}
            for path in sorted(set(here) | set(there)):
                action = await self._action(name, path, here.get(path), there.get(path), direction)
                if action is not None:
                    actions.append(action)
        return actions

    async def _action(
        self, name: str, path: str, size: int | None, remote: RemoteFile | None, direction: Direction
    ) -> Action | None:
        if remote is None:
            assert size is not None
            return Action("push", name, path, size, "not on S3") if direction != "down" else None
        if size is None:
            return Action("pull", name, path, remote.size, "not here") if direction != "up" else None
        if not await self._differs(path, remote):
            return None
        newer_here = (self.root / path).stat().st_mtime > remote.modified
        op = {"up": "push", "down": "pull"}.get(direction) or ("push" if newer_here else "pull")
        side = "here" if newer_here else "on S3"
        size_now = size if op == "push" else remote.size
        return Action("push" if op == "push" else "pull", name, path, size_now, f"differs, newer {side}")

    async def apply(self, actions: list[Action]) -> tuple[int, int]:
        """Carry out a plan; (bytes fetched, bytes sent)."""
        fetched = sent = 0
        remote = await self.remote()
        for name in sorted({a.model for a in actions}):
            pulls = [a.path for a in actions if a.model == name and a.op == "pull"]
            if pulls:
                async with exclusive(lock_path(self.root, name)):
                    fetched += await self.download(name, {p: remote[name][1][p] for p in pulls})
            pushes = [a.path for a in actions if a.model == name and a.op == "push"]
            if pushes:
                todo = [(p, await asyncio.to_thread(self.cache.sha256, p)) for p in pushes]
                sent += await self.upload(self.root, name, todo)
        return fetched, sent


def _model_files(src: Path) -> list[str]:
    """Paths (relative to ``src.parent``) of model ``src``: a single file with its sidecar, or a folder."""
    if src.is_file():
        sidecar = src.with_name(src.stem + ".config")
        extra = [p for p in sidecar.rglob("*") if p.is_file()] if sidecar.is_dir() else []
        return [p.relative_to(src.parent).as_posix() for p in [*extra, src]]
    found = local_models(src.parent).get(src.name)
    return list(found.files) if found is not None else []


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while block := f.read(4 * MIB):
            digest.update(block)
    return digest.hexdigest()
