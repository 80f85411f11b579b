"""End-to-end harness: a real fleet (uvicorn API on 127.0.0.1 + agents) on each engine.

``start_fleet(queues=..., agents=...)`` runs API and agents in the test's event loop over the
engine's real services; ``engine`` is parametrised over the embedded SQLite default, a real
redis-server and moto's server mode (SNS/SQS/S3/DynamoDB).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from sdfleet.demo import ImageServer, _input_image
from sdfleet.serve import Fleet
from sdfleet.settings import (
    AgentSettings,
    ApiSettings,
    FleetConfig,
    ModelsConfig,
    QueueConfig,
    RetryConfig,
    Settings,
)
from sdfleet.store import TaskStore, open_store

SD15 = "v1-5-pruned-emaonly.safetensors"
OTHER = "anything-v3.safetensors"
TESTS_DIR = Path(__file__).resolve().parent.parent


@dataclass
class Engine:
    name: str
    bus_url: str
    store_url: str
    storage_url: str

    def env(self) -> dict[str, str]:
        return {
            "SDFLEET_BUS_URL": self.bus_url,
            "SDFLEET_STORE_URL": self.store_url,
            "SDFLEET_STORAGE_URL": self.storage_url,
        }


def _engine(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    if name == "sqlite":
        db = f"sqlite:///{tmp_path}/fleet.db"
        return Engine(name, db, db, f"file://{tmp_path}/files")
    ns = f"e{uuid.uuid4().hex[:8]}"
    if name == "redis":
        url = f"{request.getfixturevalue('redis_server').url}?prefix={ns}"
        return Engine(name, url, url, f"file://{tmp_path}/files")
    request.getfixturevalue("moto_url")
    aws = f"aws://?prefix={ns}-&region=us-east-1"
    return Engine(name, aws, aws, f"s3://{ns}-out/results?create=true&region=us-east-1")


@pytest.fixture(params=["sqlite", "redis", "aws"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    """Each e2e test runs unchanged on every engine."""
    return _engine(request.param, request, tmp_path)


@pytest.fixture
def sqlite_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    return _engine("sqlite", request, tmp_path)


@pytest.fixture
async def store(engine: Engine) -> AsyncIterator[TaskStore]:
    """The engine's task store, as a test reads records beside the fleet."""
    s = open_store(engine.store_url)
    yield s
    await s.aclose()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdfleet.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("models")
    make_tiny(root, Path(SD15).stem, seed=0)
    make_tiny(root, Path(OTHER).stem, seed=1)
    return root


@pytest.fixture(scope="session")
def image_url() -> Iterator[str]:
    """An input image served on 127.0.0.1 (the seed's img2img link points at the internet)."""
    server = ImageServer(_input_image())
    yield server.url
    server.close()


def dedicated_and_dynamic(runtime: str = "diffusers") -> list[QueueConfig]:
    return [
        QueueConfig(name="sd15", filter={"sd_model_checkpoint": [SD15]}, model=SD15, runtime=runtime),
        QueueConfig(
            name="dynamic", filter={"sd_model_checkpoint": [{"anything-but": [SD15]}]}, runtime=runtime
        ),
    ]


@dataclass
class RunningFleet:
    settings: Settings
    fleet: Fleet
    task: asyncio.Task[None]
    api_url: str
    http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(base_url=self.api_url, timeout=30)

    async def wait(self, task_id: str, timeout_s: float = 90, states: tuple[str, ...] = ()) -> dict[str, Any]:
        """Poll ``GET /v1/tasks/{id}`` until it is terminal (or in one of ``states``)."""
        wanted = states or ("succeeded", "failed", "cancelled")
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            r = await self.http.get(f"/v1/tasks/{task_id}")
            assert r.status_code == 200, r.text
            view: dict[str, Any] = r.json()
            if view["state"] in wanted:
                return view
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"task {task_id} still {view['state']} after {timeout_s}s: {view}")
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self.fleet.stop()
        await self.http.aclose()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, timeout=60)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fleet_settings(
    engine: Engine,
    models_dir: Path,
    queues: list[QueueConfig],
    *,
    runtimes: dict[str, dict[str, Any]] | None = None,
    max_receives: int = 3,
    lease_s: float = 10,
    **agent: Any,
) -> Settings:
    fleet = FleetConfig(
        queues=queues,
        runtimes=runtimes or {},
        models=ModelsConfig(dir=models_dir, default=SD15),
        retry=RetryConfig(max_receives=max_receives, lease_s=lease_s),
    )
    agent_settings = AgentSettings(allow_private_inputs=True, wait_s=1.0, **agent)
    return Settings(
        bus_url=engine.bus_url,
        store_url=engine.store_url,
        storage_url=engine.storage_url,
        api=ApiSettings(port=free_port()),
        agent=agent_settings,
        fleet=fleet,
        log_json=False,
    )


StartFleet = Callable[..., Awaitable[RunningFleet]]


@pytest.fixture
async def start_fleet(engine: Engine, models_dir: Path) -> AsyncIterator[StartFleet]:
    """``await start_fleet(queues, agents=[...], **settings)``: API + agents, stopped at teardown."""
    running: list[RunningFleet] = []

    async def start(
        queues: list[QueueConfig] | None = None,
        *,
        agents: list[str] | None = None,
        with_api: bool = True,
        settings: Settings | None = None,
        **kwargs: Any,
    ) -> RunningFleet:
        queues = queues or dedicated_and_dynamic()
        settings = settings or fleet_settings(engine, models_dir, queues, **kwargs)
        names = [q.name for q in queues] if agents is None else agents
        fleet = Fleet(settings, names, with_api=with_api)
        task = asyncio.create_task(fleet.run())
        waiter = asyncio.create_task(fleet.started.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        rf = RunningFleet(settings, fleet, task, f"http://127.0.0.1:{settings.api.port}")
        running.append(rf)
        return rf

    yield start
    for rf in running:
        await rf.stop()


def subprocess_env(engine: Engine, config_file: Path) -> dict[str, str]:
    """Environment for an ``sdfleet agent`` subprocess sharing the test's engine."""
    env = {**os.environ, **engine.env()}
    env["SDFLEET_CONFIG_FILE"] = str(config_file)
    env["SDFLEET_AGENT__ALLOW_PRIVATE_INPUTS"] = "true"
    env["SDFLEET_AGENT__WAIT_S"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    return env
