"""The ready pool's order: highest priority first, then the loaded model, then cached ones, never
past the pass-over bound; and batch-mates by key."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from sdfleet.agent.execute import job_of
from sdfleet.agent.handle import DeliveryHandle
from sdfleet.agent.parts import Parts, Prepared
from sdfleet.agent.pool import ReadyPool
from sdfleet.bus.base import Delivery
from sdfleet.models import ModelCatalog
from sdfleet.settings import FleetConfig, ModelsConfig, QueueConfig
from sdfleet.tasks import Task, TaskParams
from sdfleet.telemetry import tracer


def prepared(name: str, model: str | None, priority: int = 0, **params: Any) -> Prepared:
    d = Delivery(
        queue="q", message_id=name, body=b"", attributes={}, receive_count=1, receipt=name, sent_at=0
    )
    task = Task(id=name, model=model, priority=priority, params=TaskParams(**params))
    return Prepared(handle=DeliveryHandle(None, d), task=task, inputs=[], span=tracer().start_span(name))  # type: ignore[arg-type]


def names(items: list[Prepared]) -> list[str]:
    return [p.task.id for p in items]


def test_loaded_then_cached_then_oldest() -> None:
    pool = ReadyPool(max_pass_over_s=60)
    for name, model in [("a", "m1"), ("b", "m2"), ("c", "m3"), ("d", "m2")]:
        pool.put(prepared(name, model))
    assert names(pool.take(["m2", "m3"])) == ["b"]
    assert names(pool.take(["m3", "m2"])) == ["c"]
    assert names(pool.take(["m9"])) == ["a"]  # nothing loaded: arrival order
    assert names(pool.take(["m2"])) == ["d"]
    assert pool.take(["m2"]) == [] and len(pool) == 0


def test_task_naming_no_model_runs_on_the_loaded_one() -> None:
    pool = ReadyPool()
    pool.put(prepared("other", "m2"))
    pool.put(prepared("any", None))
    assert names(pool.take(["m1"])) == ["any"]


def test_no_task_is_passed_over_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = ReadyPool(max_pass_over_s=5)
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    pool.put(prepared("old", "m2"))
    for i in range(3):
        pool.put(prepared(f"new{i}", "m1"))
    assert names(pool.take(["m1"])) == ["new0"]
    now[0] += 5.0  # "old" has waited as long as the bound allows: it goes first, switch or not
    assert names(pool.take(["m1"])) == ["old"]
    assert names(pool.take(["m1"])) == ["new1"]


def test_higher_priority_first_then_the_loaded_model(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = ReadyPool(max_pass_over_s=5)
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    for name, model, priority in [("a", "m1", 0), ("b", "m2", 5), ("c", "m1", 5), ("d", "m2", 9)]:
        pool.put(prepared(name, model, priority))
    assert names(pool.take(["m1"])) == ["d"]  # the highest, though a switch
    assert names(pool.take(["m2"])) == ["b"]  # of the 5s, the loaded model's
    now[0] += 5.0  # "a" and "c" have waited the bound: they go first, whatever their priority
    pool.put(prepared("e", "m1", 7))
    assert names(pool.take(["m1"])) == ["a"]
    assert names(pool.take(["m1"])) == ["c"]
    assert names(pool.take(["m1"])) == ["e"]


def test_batch_mates_of_higher_priority_take_the_room_first() -> None:
    pool = ReadyPool()
    for name, priority in [("t0", 1), ("t1", 0), ("t2", 0), ("t3", 3), ("t4", 3)]:
        pool.put(prepared(name, "m1", priority, steps=20))

    def key(p: Prepared) -> object:
        return p.task.params.steps

    assert names(pool.take(["m1"], max_batch=3, key=key)) == ["t3", "t4", "t0"]
    assert names(pool.take(["m1"], max_batch=3, key=key)) == ["t1", "t2"]


def test_zero_bound_is_arrival_order() -> None:
    pool = ReadyPool(max_pass_over_s=0)
    pool.put(prepared("a", "m2"))
    pool.put(prepared("b", "m1", priority=9))
    assert names(pool.take(["m1"])) == ["a"]


def test_batch_mates_share_the_key_up_to_max_batch() -> None:
    pool = ReadyPool()
    for i, steps in enumerate([20, 30, 20, 20, 20]):
        pool.put(prepared(f"t{i}", "m1", steps=steps))

    def key(p: Prepared) -> object:
        return p.task.params.steps

    assert names(pool.take(["m1"], max_batch=3, key=key)) == ["t0", "t2", "t3"]
    assert names(pool.take(["m1"], max_batch=3, key=key)) == ["t1"]
    first = pool.take(["m1"], max_batch=1, key=key)
    assert names(first) == ["t4"]
    pool.put(prepared("late", "m1", steps=20))
    pool.put(prepared("other", "m1", steps=5))
    assert names(pool.company(first, key, room=2)) == ["late"]
    assert names(pool.drain()) == ["other"]


def test_key_none_runs_alone() -> None:
    pool = ReadyPool()
    pool.put(prepared("a", "m1"))
    pool.put(prepared("b", "m1"))
    assert names(pool.take(["m1"], max_batch=4, key=lambda p: None)) == ["a"]


def test_a_tasks_job_is_built_once_however_often_the_pool_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order and the batching ask for a pooled task's model at every look; a task naming none
    runs on the models folder's first model, and the folder (maybe a network volume) is listed
    once for it, not once per look."""
    for name in ("b-model", "a-model"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
    listings: list[Path] = []
    listing = ModelCatalog.list

    def counted(self: ModelCatalog) -> list[Any]:
        listings.append(self.models_dir)
        return listing(self)

    monkeypatch.setattr(ModelCatalog, "list", counted)
    fleet = FleetConfig(models=ModelsConfig(dir=tmp_path))
    parts = cast(Parts, SimpleNamespace(fleet=fleet, queue=QueueConfig(name="q")))
    pool = ReadyPool()
    for name in ("t1", "t2", "t3"):
        pool.put(prepared(name, None))

    def model_of(p: Prepared) -> str | None:
        return job_of(parts, p).model

    taken = [p for _ in range(3) for p in pool.take(["a-model"], model_of=model_of)]
    assert names(taken) == ["t1", "t2", "t3"]
    assert [job_of(parts, p).model for p in taken] == ["a-model"] * 3
    assert len(listings) == 3
    named = prepared("t4", "c-model")
    assert job_of(parts, named).model == "c-model" and len(listings) == 3
