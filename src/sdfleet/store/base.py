"""The task store: one record per task, changed only by compare-and-set on ``version``.

Backends implement four primitives; the state machine lives once, here, in ``transition()``
(and ``reopened()``, a finished seed task's next run).

Retention (``fleet.retain_days``, a store's ``retain_s``): a finished task's record is kept
``retain_s`` after it ended (``expires_at``), then it is gone: ``get`` and ``list`` stop showing it
at once, its id can be used again, and the engine removes it (Redis expiry, DynamoDB TTL, a sweep
of a few at each finish on SQLite and Redis's indexes). A record that can still change (queued,
running) never expires; one run again (``reopened``) is kept again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from pydantic import ValidationError

from sdfleet.errors import NotFound, StoreError, TransitionConflict
from sdfleet.tasks import EARLIER_PUBLISHES, Task, TaskRecord, TaskState

# Allowed moves of the state machine (DESIGN.md): running → queued is a retry.
ALLOWED: dict[TaskState, set[TaskState]] = {
    TaskState.QUEUED: {TaskState.RUNNING, TaskState.FAILED, TaskState.CANCELLED},
    TaskState.RUNNING: {
        TaskState.RUNNING,  # a redelivered task taken over from a dead worker (attempt + 1)
        TaskState.QUEUED,
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.CANCELLED,
    },
    TaskState.SUCCEEDED: set(),
    TaskState.FAILED: set(),
    TaskState.CANCELLED: set(),
}


SWEEP = 16
"""Expired records a finishing write removes with it (SQLite rows, Redis index entries): more than
one, so a backlog of expired records shrinks while tasks finish."""


def expires_at(record: TaskRecord, retain_s: float | None) -> float | None:
    """When ``record`` may go (epoch s): ``retain_s`` after its task ended; None while it can still
    change or when records are kept for ever."""
    if retain_s is None or not record.state.terminal:
        return None
    return (record.finished_at or record.updated_at) + retain_s


class TaskStore(Protocol):
    """Records are keyed by (tenant, task id): ids are per tenant, so another tenant's id is
    simply another task."""

    async def create(self, record: TaskRecord) -> tuple[TaskRecord, bool]:
        """Insert ``record`` unless its tenant already has its id; returns (stored record, created?)."""

    async def get(self, tenant: str, task_id: str) -> TaskRecord | None:
        """The record of ``tenant``'s task ``task_id``, or None."""

    async def compare_and_set(self, record: TaskRecord, expected_version: int) -> bool:
        """Replace the record of (``record.tenant``, ``record.id``) iff the stored one still has
        ``expected_version``.

        ``record.version`` must already be ``expected_version + 1``.
        """

    async def delete(self, tenant: str, task_id: str, expected_version: int) -> bool:
        """Remove the record of (``tenant``, ``task_id``) iff the stored one still has
        ``expected_version``; False when it changed or is gone (``DELETE /v1/tasks/{id}``)."""

    async def list(
        self,
        tenant: str,
        *,
        state: TaskState | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[TaskRecord], str | None]:
        """A tenant's tasks, newest first; returns (page, cursor of the next page or None)."""

    async def aclose(self) -> None: ...


def read_record(raw: str | bytes) -> TaskRecord:
    """A stored record's JSON → ``TaskRecord``; ``StoreError`` (not a crash) for one that cannot be
    read back, so a single bad record fails its own request or delivery and nothing else."""
    try:
        return TaskRecord.model_validate_json(raw)
    except ValidationError as e:
        reason = e.errors()[0]["msg"]
        raise StoreError(f"stored task record is unreadable: {reason}", code="bad_record") from e


def reopened(
    record: TaskRecord,
    task: Task,
    *,
    published_at: float | None = None,
    message_id: str | None = None,
) -> TaskRecord:
    """The record of ``task``, the next run of finished ``record``'s id (``Task.run``): queued
    again, its attempts, result and error cleared, for ``compare_and_set`` against ``record``'s
    version. The one way out of a terminal state, and only into a new run: ``transition`` never
    leaves one. ``created_at`` stays the id's first, so listings keep their order."""
    if not record.state.terminal:
        raise TransitionConflict(f"task {record.id} is {record.state}: only a finished task runs again")
    if task.run <= record.task.run:
        raise TransitionConflict(f"task {record.id}: run {task.run} is not after run {record.task.run}")
    task = task.model_copy(update={"created_at": record.task.created_at})
    earlier = [*record.earlier_publishes, *([record.message_id] if record.message_id else [])]
    return TaskRecord(
        task=task,
        version=record.version + 1,
        published_at=published_at,
        message_id=message_id,
        earlier_publishes=earlier[-EARLIER_PUBLISHES:],
    )


async def reopen(
    store: TaskStore,
    finished: TaskRecord,
    task: Task,
    *,
    published_at: float | None = None,
    message_id: str | None = None,
) -> TaskRecord | None:
    """Write ``reopened(finished, task)``; when another writer changed the record first (the API
    and an agent both reopen a seed task's next run), the record as that writer left it, None if
    it is gone. Callers tell from ``.task.run`` whose run it is."""
    new = reopened(finished, task, published_at=published_at, message_id=message_id)
    if await store.compare_and_set(new, finished.version):
        return new
    return await store.get(task.tenant, task.id)


Mutation = Callable[[TaskRecord], TaskRecord | None]


async def transition(
    store: TaskStore,
    tenant: str,
    task_id: str,
    mutate: Mutation,
    *,
    tries: int = 20,
    current: TaskRecord | None = None,
) -> TaskRecord:
    """Apply ``mutate`` to the current record with compare-and-set, retrying on a lost race.

    ``mutate`` gets a copy and returns the new record, or None to leave it as is (then the
    current record is returned). It may raise ``TransitionConflict`` to refuse the move.
    ``current``: the record as last written or read by the caller; the first try uses it instead
    of reading the store (one call saved when nobody else wrote meanwhile; a lost race reads).
    """
    for _ in range(tries):
        if current is None:
            current = await store.get(tenant, task_id)
        if current is None:
            raise NotFound(f"task {task_id!r} not found")
        new = mutate(current.model_copy(deep=True))
        if new is None:
            return current
        if new.state not in ALLOWED[current.state] and new.state != current.state:
            raise TransitionConflict(f"task {task_id}: {current.state} → {new.state} is not allowed")
        if current.state.terminal:
            raise TransitionConflict(f"task {task_id} is already {current.state}")
        new.version = current.version + 1
        new.updated_at = time.time()
        if await store.compare_and_set(new, current.version):
            return new
        current = None
    raise TransitionConflict(f"task {task_id}: too many concurrent writers")
