"""Backend fixtures for the task-store and blob-storage contract suites.

Adding a backend = one factory below + its name in the registry dict. A factory gets the pytest
request (for service fixtures: ``request.getfixturevalue("redis_server")`` / ``("moto_url")``), a
private tmp dir and, for a store, ``retain_s`` (how long finished records are kept), and returns
an opened backend; the fixture closes it. Backends on a shared service must namespace per call
(unique key prefix, table or bucket) so tests never see each other's data.

    async def _redis_store(request, tmp_path, retain_s):
        server = request.getfixturevalue("redis_server")
        return RedisTaskStore.from_url(f"{server.url}?prefix=t-{uuid.uuid4().hex}", retain_s=retain_s)

    STORE_FACTORIES["redis"] = _redis_store
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sdfleet.storage.backends.local import LocalBlobStore
from sdfleet.storage.backends.s3 import S3BlobStore
from sdfleet.storage.base import BlobStore
from sdfleet.store.backends.dynamodb import DynamoTaskStore
from sdfleet.store.backends.redis import RedisTaskStore
from sdfleet.store.backends.sqlite import SqliteTaskStore
from sdfleet.store.base import TaskStore
from sdfleet.tasks import TaskRecord, TaskState


def tenant_name() -> str:
    """Unique per test, so backends on a shared service never mix tests' data."""
    return f"t-{uuid.uuid4().hex[:10]}"


def set_state(state: TaskState, **changes: object) -> Callable[[TaskRecord], TaskRecord]:
    """A ``transition`` mutation: ``state``, and the fields in ``changes``."""

    def mutate(rec: TaskRecord) -> TaskRecord:
        rec.state = state
        for name, value in changes.items():
            setattr(rec, name, value)
        return rec

    return mutate


StoreFactory = Callable[[pytest.FixtureRequest, Path, float | None], Awaitable[TaskStore]]
"""(request, private tmp dir, ``retain_s``) → an opened store."""
BlobFactory = Callable[[pytest.FixtureRequest, Path], Awaitable[BlobStore]]


async def _sqlite_store(request: pytest.FixtureRequest, tmp_path: Path, retain_s: float | None) -> TaskStore:
    return SqliteTaskStore.from_url(f"sqlite:///{tmp_path / 'sdfleet.db'}", retain_s=retain_s)


async def _local_blobs(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    return LocalBlobStore.from_url(f"file://{tmp_path / 'files'}")


async def _redis_store(request: pytest.FixtureRequest, tmp_path: Path, retain_s: float | None) -> TaskStore:
    server = request.getfixturevalue("redis_server")
    return RedisTaskStore.from_url(f"{server.url}?prefix=t-{uuid.uuid4().hex}", retain_s=retain_s)


async def _dynamodb_store(
    request: pytest.FixtureRequest, tmp_path: Path, retain_s: float | None
) -> TaskStore:
    request.getfixturevalue("moto_url")  # moto_server on 127.0.0.1; sets AWS_ENDPOINT_URL
    url = f"aws://?table=t-{uuid.uuid4().hex[:12]}&region=us-east-1"
    return DynamoTaskStore.from_url(url, retain_s=retain_s)


async def _s3_blobs(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    request.getfixturevalue("moto_url")
    return S3BlobStore.from_url(f"s3://b-{uuid.uuid4().hex[:12]}/results?create=true&region=us-east-1")


STORE_FACTORIES: dict[str, StoreFactory] = {
    "sqlite": _sqlite_store,
    "redis": _redis_store,
    "dynamodb": _dynamodb_store,
}
BLOB_FACTORIES: dict[str, BlobFactory] = {"local": _local_blobs, "s3": _s3_blobs}


@pytest.fixture(params=list(STORE_FACTORIES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TaskStore]:
    """A fresh, empty task store of each backend."""
    backend = await STORE_FACTORIES[request.param](request, tmp_path, None)
    yield backend
    await backend.aclose()


RETAIN_S = 3600.0


@pytest.fixture(params=list(STORE_FACTORIES))
async def retaining_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TaskStore]:
    """A fresh store of each backend that keeps finished records ``RETAIN_S`` (tests make a record
    expire by finishing it that long ago)."""
    backend = await STORE_FACTORIES[request.param](request, tmp_path, RETAIN_S)
    yield backend
    await backend.aclose()


@pytest.fixture(params=list(BLOB_FACTORIES))
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    """A fresh, empty blob store of each backend."""
    backend = await BLOB_FACTORIES[request.param](request, tmp_path)
    yield backend
    await backend.aclose()
