"""Models fetched on demand from ``models.s3`` (moto in server mode, real files): the first task
of a model waits for its download in a ``model_download`` stage, later ones don't; a disk budget
evicts the least recently used model that S3 also holds and nobody uses."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sdfleet.errors import DiskFull, NotFound
from sdfleet.models.catalog import ModelCatalog
from sdfleet.models.fetcher import ModelFetcher
from sdfleet.models.progress import Silent
from sdfleet.models.remote import ModelBucket
from sdfleet.models.sync import ModelSync
from sdfleet.serve import Fleet
from sdfleet.settings import AgentSettings, ApiSettings, FleetConfig, ModelsConfig, QueueConfig, Settings
from sdfleet.telemetry import setup_tracing

MIB = 2**20


@pytest.fixture
def bucket_url(moto_url: str) -> str:
    name = f"fetch-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_url).create_bucket(Bucket=name)
    return f"s3://{name}/models"


async def push(url: str, *paths: Path) -> None:
    bucket = ModelBucket(url)
    try:
        tool = ModelSync(paths[0].parent, bucket, Silent(), part_size=5 * MIB, jobs=4)
        for path in paths:
            await tool.push(path)
    finally:
        bucket.close()


def random_models(folder: Path, *names: str, size: int = MIB) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        (folder / name).write_bytes(os.urandom(size))
        out.append(folder / name)
    return out


async def test_fetch_downloads_once_and_reports_the_time(tmp_path: Path, bucket_url: str) -> None:
    await push(bucket_url, *random_models(tmp_path / "src", "a.safetensors"))
    catalog = ModelCatalog(tmp_path / "models", ModelFetcher(tmp_path / "models", bucket_url))
    first, second = await asyncio.gather(catalog.fetch("a"), catalog.fetch("a.safetensors"))
    assert first[0].name == second[0].name == "a.safetensors"
    assert first[1] > 0 and second[1] > 0  # the second waited for the first one's download
    info, seconds = await catalog.fetch("a")
    assert seconds == 0.0 and info.path.stat().st_size == MIB
    with pytest.raises(NotFound, match=r"'nope' not found in .*models.*; model 'nope' is not in s3://"):
        await catalog.fetch("nope")


async def test_disk_budget_evicts_the_least_recently_used_unused_model(
    tmp_path: Path, bucket_url: str
) -> None:
    names = ["a.safetensors", "b.safetensors", "c.safetensors", "d.safetensors"]
    await push(bucket_url, *random_models(tmp_path / "src", *names))
    root = tmp_path / "models"
    random_models(root, "mine.safetensors")  # only on this disk: never evicted

    def on_disk() -> list[str]:
        return sorted(p.name for p in root.glob("*.safetensors"))

    fetcher = ModelFetcher(root, bucket_url, disk_budget=int(3.5 * MIB), keep=1)
    catalog = ModelCatalog(root, fetcher)
    other_agent = ModelFetcher(root, bucket_url)  # another process on the node
    try:
        await catalog.fetch("a")
        await catalog.fetch("b")  # 3 MiB with mine; this agent holds b now, not a
        await catalog.fetch("c")  # a is the least recently used model nobody holds
        assert on_disk() == ["b.safetensors", "c.safetensors", "mine.safetensors"]
        other_agent.use("b.safetensors")
        with pytest.raises(
            DiskFull, match=r"d\.safetensors .* does not fit models\.disk_budget_gb=0\.00341797"
        ):
            await catalog.fetch("d")  # b is in use there, c here, mine is only here
        assert on_disk() == ["b.safetensors", "c.safetensors", "mine.safetensors"]
        other_agent.release_all()
        _, seconds = await catalog.fetch("d")
        assert seconds > 0
        assert on_disk() == ["c.safetensors", "d.safetensors", "mine.safetensors"]
    finally:
        other_agent.release_all()
        fetcher.release_all()


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        setup_tracing("sdfleet-test", exporter=exporter)
    yield exporter


async def test_first_task_of_a_model_waits_for_its_download(
    tmp_path: Path, bucket_url: str, spans: InMemorySpanExporter
) -> None:
    from sdfleet.models.tiny import make_tiny

    await push(bucket_url, make_tiny(tmp_path / "src", "tiny-remote"))
    # A folder with another model in it: the API (same folder) must not refuse one only S3 has.
    make_tiny(tmp_path / "models", "tiny-local")
    port, fleet = fetching_fleet(tmp_path, tmp_path / "models", bucket_url)
    running = asyncio.create_task(fleet.run())
    try:
        await asyncio.wait_for(fleet.started.wait(), 60)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            body = {
                "model": "tiny-remote",
                "params": {"prompt": "a boat", "steps": 2, "width": 64, "height": 64},
            }
            first = await run_task(http, body)
            second = await run_task(http, body)
    finally:
        fleet.stop()
        await running
    assert first["timings"]["model_download"] > 0, first["timings"]
    assert "model_download" not in second["timings"], second["timings"]
    assert (tmp_path / "models" / "tiny-remote" / "model_index.json").is_file()
    downloads = [
        s
        for s in spans.get_finished_spans()
        if s.name == "model.download"
        and s.attributes
        and s.attributes.get("sdfleet.task_id") in (first["id"], second["id"])
    ]
    assert [s.attributes["sdfleet.task_id"] for s in downloads if s.attributes] == [first["id"]]


def fetching_fleet(tmp_path: Path, models: Path, bucket_url: str) -> tuple[int, Fleet]:
    """API and agent of queue ``default`` on a free port, fetching models from ``bucket_url``."""
    with socket_port() as port:
        settings = Settings(
            data_dir=tmp_path / "data",
            api=ApiSettings(port=port),
            agent=AgentSettings(wait_s=0.5),
            fleet=FleetConfig(
                queues=[QueueConfig(name="default")], models=ModelsConfig(dir=models, s3=bucket_url)
            ),
            log_json=False,
        )
    return port, Fleet(settings, ["default"])


async def run_task(http: httpx.AsyncClient, body: dict[str, object]) -> dict[str, object]:
    r = await http.post("/v1/tasks", json=body)
    assert r.status_code == 202, r.text
    for _ in range(600):
        view = (await http.get(f"/v1/tasks/{r.json()['id']}")).json()
        if view["state"] in ("succeeded", "failed", "cancelled"):
            assert view["state"] == "succeeded", view
            return dict(view)
        await asyncio.sleep(0.1)
    raise AssertionError(f"task still {view['state']}")


class socket_port:
    """A free TCP port on 127.0.0.1."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None


async def test_a_read_only_models_folder_serves_its_models_with_models_s3_set(
    read_only: Callable[[Path], Path], tmp_path: Path, bucket_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The chart mounts models read-only and the CDK app mounts the bucket read-only with
    ``models.s3`` set: the fetcher's locks there made every task fail (EROFS, an OSError)."""
    from sdfleet.models.tiny import make_tiny

    src = tmp_path / "models"
    make_tiny(src, "tiny-local")
    models = read_only(src)
    await push(bucket_url, make_tiny(tmp_path / "src", "tiny-remote"))
    with pytest.raises(OSError, match=r"Read-only file system|Permission denied"):
        (models / ".sdfleet").mkdir()
    port, fleet = fetching_fleet(tmp_path, models, bucket_url)
    running = asyncio.create_task(fleet.run())
    try:
        await asyncio.wait_for(fleet.started.wait(), 60)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            params = {"prompt": "a boat", "steps": 2, "width": 64, "height": 64}
            view = await run_task(http, {"model": "tiny-local", "params": params})
            r = await http.post("/v1/tasks", json={"model": "tiny-remote", "params": params})
            assert r.status_code == 202, r.text
            for _ in range(300):
                remote = (await http.get(f"/v1/tasks/{r.json()['id']}")).json()
                if remote["state"] in ("succeeded", "failed"):
                    break
                await asyncio.sleep(0.1)
    finally:
        fleet.stop()
        await running
    assert view["images"], view
    # Not on the read-only folder: a clear failure, not an OSError from a lock file.
    assert remote["state"] == "failed" and remote["error"]["code"] == "unknown_model", remote
    assert "read-only" in caplog.text and "not fetched on demand" in caplog.text
    assert not (src / ".sdfleet").exists()
