"""Task store backends, chosen by URL scheme (``sqlite://``, ``aws://`` = DynamoDB, ``redis://``)."""

from __future__ import annotations

from sdfleet.registry import load_backend
from sdfleet.store.base import TaskStore, transition

_BACKENDS = {
    "sqlite": ("sdfleet.store.backends.sqlite", "SqliteTaskStore", None),
    "aws": ("sdfleet.store.backends.dynamodb", "DynamoTaskStore", "aws"),
    "redis": ("sdfleet.store.backends.redis", "RedisTaskStore", "redis"),
    "rediss": ("sdfleet.store.backends.redis", "RedisTaskStore", "redis"),
}


def open_store(url: str, *, retain_s: float | None = None) -> TaskStore:
    """The task store at ``url``; ``retain_s``: how long a finished task's record is kept (None:
    for ever)."""
    store: TaskStore = load_backend("task store", _BACKENDS, url, retain_s=retain_s)
    return store


__all__ = ["TaskStore", "open_store", "transition"]
