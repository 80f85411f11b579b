"""On-demand models: a task names a model that is not on disk but is in ``models.s3``; fetch it.

One download per model per node: the pull holds the model's file lock, so other agents (in this
process or another one sharing the models folder) wait for it and then find the model on disk.

Disk budget (``models.disk_budget_gb``): before a download that would pass it, models are deleted,
least recently used first, but only models that S3 also holds (they can come back) and that no
process is using. A process uses the last ``keep`` models it resolved (the runtime keeps about that
many loaded): it holds each one's ``.use`` lock shared, and eviction skips a model whose lock it
cannot take. The time of last use is the ``.use`` file's mtime, touched on every resolve.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import OrderedDict
from pathlib import Path

from sdfleet.errors import DiskFull
from sdfleet.models.layout import STATE_DIR, local_models, top_entries
from sdfleet.models.locks import SharedLock, lock_path, unless_used
from sdfleet.models.progress import Silent
from sdfleet.models.remote import ModelBucket
from sdfleet.models.sync import MakeRoom, ModelSync, PullResult, mib

log = logging.getLogger(__name__)
GIB = 2**30


class ModelFetcher:
    """Pulls models from ``url`` into ``root`` when asked, within a disk budget."""

    def __init__(
        self,
        root: Path,
        url: str,
        *,
        disk_budget: int | None = None,
        part_size: int = 16 * 2**20,
        jobs: int = 8,
        keep: int = 2,
    ) -> None:
        self.root = Path(root)
        self.url = url
        self.disk_budget = disk_budget
        self.part_size = part_size
        self.jobs = jobs
        self.keep = max(1, keep)
        self._held: OrderedDict[str, SharedLock] = OrderedDict()

    async def pull(self, name: str) -> PullResult:
        """Download ``name`` (``NotFound`` when S3 does not have it either)."""
        async with ModelBucket(self.url, jobs=self.jobs) as bucket:
            tool = ModelSync(self.root, bucket, Silent(), part_size=self.part_size, jobs=self.jobs)
            result = await tool.pull(name, make_room=self._make_room_in(tool))
        log.info(
            "fetched model %s from %s: %s in %.1f s (waited %.1f s for another download)",
            result.name,
            self.url,
            mib(result.fetched),
            result.seconds,
            result.waited_s,
        )
        return result

    def use(self, name: str) -> None:
        """``name`` is being used by this process: hold it, mark it recently used, and let go of the
        model used least recently beyond the last ``keep``."""
        path = lock_path(self.root, name, "use")
        if name not in self._held:
            self._held[name] = SharedLock(path)
        self._held.move_to_end(name)
        os.utime(path)
        while len(self._held) > self.keep:
            _, lock = self._held.popitem(last=False)
            lock.release()

    def release_all(self) -> None:
        while self._held:
            self._held.popitem()[1].release()

    def _make_room_in(self, tool: ModelSync) -> MakeRoom:
        async def make_room(name: str, needed: int) -> None:
            if self.disk_budget is None:
                return
            remote = await tool.remote()
            self.evict(needed, keep=name, evictable=set(remote))

        return make_room

    def evict(self, needed: int, *, keep: str, evictable: set[str]) -> list[str]:
        """Delete unused models in ``evictable`` until ``needed`` more bytes fit the budget; the
        names deleted. ``DiskFull`` when they are not enough."""
        assert self.disk_budget is not None
        local = local_models(self.root)
        over = sum(m.size for m in local.values()) + needed - self.disk_budget
        deleted: list[str] = []
        for name in sorted(local, key=self._last_used):
            if over <= 0:
                break
            if name == keep or name not in evictable:
                continue
            with unless_used(lock_path(self.root, name, "use")) as free:
                if not free:
                    continue
                _delete(self.root, name)
            log.info("evicted model %s (%s, least recently used) for %s", name, mib(local[name].size), keep)
            over -= local[name].size
            deleted.append(name)
        if over > 0:
            budget = self.disk_budget / GIB
            raise DiskFull(
                f"model {keep} ({mib(needed)}) does not fit models.disk_budget_gb={budget:g}: "
                f"{mib(over)} more would be needed and every other model is in use or only on this disk"
            )
        return deleted

    def _last_used(self, name: str) -> float:
        use = self.root / STATE_DIR / "locks" / f"{name}.use"
        try:
            return use.stat().st_mtime
        except FileNotFoundError:
            return (self.root / name).stat().st_mtime


def _delete(root: Path, name: str) -> None:
    """Remove a model: first out of sight (one rename per entry, weights first), then from disk."""
    trash = root / STATE_DIR / "trash"
    trash.mkdir(parents=True, exist_ok=True)
    for entry in reversed(top_entries(name)):
        path = root / entry
        if not path.exists():
            continue
        gone = trash / f"{entry}-{time.time_ns()}"
        os.rename(path, gone)
        if gone.is_dir():
            shutil.rmtree(gone, ignore_errors=True)
        else:
            gone.unlink(missing_ok=True)
