"""A task that names no model runs on the fleet's default: ``models.default``, else the first model of
the models folder (as SD WebUI loads its first checkpoint); one whose model cannot be resolved is a
422 at submit, never a task that fails later."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import Engine, RunningFleet, fleet_settings
from sdfleet.models.tiny import make_tiny
from sdfleet.serve import Fleet
from sdfleet.settings import QueueConfig, Settings

pytestmark = pytest.mark.timeout(120)
PARAMS = {"prompt": "a cat on a sofa", "steps": 2, "width": 64, "height": 64, "seed": 1}


@pytest.fixture(scope="module")
def one_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("one-model")
    make_tiny(root, "v1-5-pruned-emaonly.safetensors")  # as `sdfleet models make-tiny NAME` names it
    return root


def _settings(engine: Engine, models_dir: Path) -> Settings:
    """The fleet without a fleet file: one `default` queue, no `models.default`."""
    settings = fleet_settings(engine, models_dir, [QueueConfig(name="default")])
    settings.fleet.models.default = None
    return settings


@contextlib.asynccontextmanager
async def _running(settings: Settings, queues: list[str], *, with_api: bool) -> AsyncIterator[RunningFleet]:
    fleet = Fleet(settings, queues, with_api=with_api)
    task = asyncio.create_task(fleet.run())
    waiter = asyncio.create_task(fleet.started.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    running = RunningFleet(settings, fleet, task, f"http://127.0.0.1:{settings.api.port}")
    try:
        yield running
    finally:
        await running.stop()


async def test_no_model_named_runs_on_the_single_model(sqlite_engine: Engine, one_model: Path) -> None:
    async with _running(_settings(sqlite_engine, one_model), ["default"], with_api=True) as fleet:
        r = await fleet.http.post("/v1/tasks", json={"params": PARAMS})
        assert r.status_code == 202, r.text
        assert r.json()["model"] == "v1-5-pruned-emaonly.safetensors"  # stamped at submit
        view = await fleet.wait(r.json()["id"])
        assert view["state"] == "succeeded", view
        assert len(view["images"]) == 1


async def test_unknown_model_is_422_with_the_fleets_models(sqlite_engine: Engine, one_model: Path) -> None:
    async with _running(_settings(sqlite_engine, one_model), [], with_api=True) as fleet:
        r = await fleet.http.post("/v1/tasks", json={"model": "nope.safetensors", "params": PARAMS})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "unknown_model"
        assert "nope.safetensors" in error["message"]
        assert "v1-5-pruned-emaonly.safetensors" in error["message"]  # what the fleet has
        listed = await fleet.http.get("/v1/tasks")
        assert listed.json()["tasks"] == [], "nothing was accepted"


async def test_an_api_without_the_models_folder_leaves_the_choice_to_agents(
    sqlite_engine: Engine, one_model: Path, tmp_path: Path
) -> None:
    """As in the Helm chart, where only workers mount the models volume: the API cannot resolve a
    default, accepts the task without a model, and the agent runs it on its folder's first model."""
    api_side = _settings(sqlite_engine, tmp_path / "no-models-here")
    agent_side = _settings(sqlite_engine, one_model)
    agent_side.api = api_side.api
    async with (
        _running(api_side, [], with_api=True) as api,
        _running(agent_side, ["default"], with_api=False),
    ):
        r = await api.http.post("/v1/tasks", json={"params": PARAMS})
        assert r.status_code == 202, r.text
        assert r.json()["model"] is None
        view = await api.wait(r.json()["id"])
        assert view["state"] == "succeeded", view
