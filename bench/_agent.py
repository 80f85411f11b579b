"""One agent against a backlog, in this process: how busy it keeps its runtime, and what it costs.

``backlog_run`` opens an engine (``_fleet.open_engine``), puts ``n`` tasks on the queue as the API
does (record, then message), runs one agent in burst mode until the queue is empty, and reads the
records back. The engines the agent sees count every call, so the calls per task come out too.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _fleet import QUEUE, Engine, open_engine
from sdfleet.agent.loop import Agent
from sdfleet.build import Engines, agent_parts, make_runtime
from sdfleet.routing import stamp, task_attributes
from sdfleet.settings import AgentSettings, FleetConfig, ModelsConfig, QueueConfig, RetryConfig, Settings
from sdfleet.tasks import Task, TaskParams, TaskRecord

ENGINES = ("sqlite", "redis", "aws")


class Counting:
    """``inner`` with every coroutine method call counted in ``counts`` as ``<part>.<method>``."""

    def __init__(self, inner: Any, part: str, counts: Counter[str]) -> None:
        self._inner, self._part, self._counts = inner, part, counts

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self._counts[f"{self._part}.{name}"] += 1
            return await attr(*args, **kwargs)

        return counted


@dataclass
class Backlog:
    engine: str
    n: int
    wall_s: float
    """First runtime start to last task finished (records' started_at / finished_at)."""
    states: Counter[str]
    calls: Counter[str]
    records: list[TaskRecord] = field(default_factory=list)
    switches: int = 0

    def per_task(self) -> dict[str, float]:
        return {k: round(v / self.n, 2) for k, v in sorted(self.calls.items())}


@contextmanager
def aws_env(engine: Engine) -> Iterator[None]:
    """moto's endpoint and credentials for this process (the agent runs here)."""
    saved = {k: os.environ.get(k) for k in engine.env}
    os.environ.update(engine.env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def aws_calls(counts: Counter[str]) -> Iterator[None]:
    """Count AWS API calls as ``aws.<Operation>`` (a batch call counts once) while inside."""
    from botocore.client import BaseClient

    client: Any = BaseClient  # botocore's stubs do not declare the private method patched here
    original = client._make_api_call

    def counted(self: Any, operation: str, params: Any) -> Any:
        counts[f"aws.{operation}"] += 1
        return original(self, operation, params)

    client._make_api_call = counted
    try:
        yield
    finally:
        client._make_api_call = original


def settings_for(
    engine: Engine,
    workdir: Path,
    runtime: str,
    runtime_options: dict[str, Any],
    agent: dict[str, Any],
    models_dir: Path | None = None,
) -> Settings:
    fleet = FleetConfig(
        queues=[QueueConfig(name=QUEUE, runtime=runtime)],
        runtimes={runtime: runtime_options},
        models=ModelsConfig(dir=models_dir or workdir / "models"),
        retry=RetryConfig(lease_s=60, max_receives=3),
        results_queue="results",
    )
    return Settings(
        data_dir=workdir,
        bus_url=engine.bus_url,
        store_url=engine.store_url,
        storage_url=engine.storage_url,
        agent=AgentSettings(**{"wait_s": 0.2, **agent}),
        fleet=fleet,
        log_json=False,
        log_level="WARNING",
    )


async def put_backlog(engines: Engines, settings: Settings, tasks: list[Task]) -> None:
    """As ``POST /v1/tasks`` does: the record, then the message."""
    for task in tasks:
        await engines.store.create(TaskRecord(task=task))
        attrs = stamp(task_attributes(task, tier="standard"))
        await engines.bus.publish(settings.fleet.tasks_topic, task.to_message(), attrs)


def text_tasks(n: int, size: int, model: Callable[[int], str | None] = lambda i: None) -> list[Task]:
    return [
        Task(
            model=model(i),
            queue=QUEUE,
            params=TaskParams(prompt=f"bench {i}", steps=2, width=size, height=size, seed=i),
        )
        for i in range(n)
    ]


async def backlog_run(settings: Settings, engine: Engine, tasks: list[Task]) -> Backlog:
    counts: Counter[str] = Counter()
    with aws_env(engine):
        engines = Engines(settings)
        try:
            await engines.ensure()
            await put_backlog(engines, settings, tasks)
            counted = Engines.__new__(Engines)
            counted.settings = settings
            counted.bus = Counting(engines.bus, "bus", counts)
            counted.store = Counting(engines.store, "store", counts)
            counted.storage = Counting(engines.storage, "storage", counts)
            counted.keeper = engines.keeper
            runtime = make_runtime(settings, QUEUE)
            parts = agent_parts(settings, counted, QUEUE, runtime)
            try:
                with aws_calls(counts):
                    await Agent(parts, burst=True).run()
            finally:
                await runtime.aclose()
                await parts.fetcher.aclose()
                for notifier in parts.notifiers:
                    await notifier.aclose()
            records = [r for r in [await engines.store.get(t.tenant, t.id) for t in tasks] if r is not None]
        finally:
            await engines.aclose()
    started = [r.started_at for r in records if r.started_at]
    finished = [r.finished_at for r in records if r.finished_at]
    wall = (max(finished) - min(started)) if started and finished else float("nan")
    states = Counter(r.state.value for r in records)
    switches = getattr(runtime, "switches", 0)
    return Backlog(settings.fleet.queues[0].name, len(tasks), wall, states, counts, records, switches)


def engine_for(kind: str, workdir: Path) -> Engine:
    return open_engine(kind, workdir, {"bus": None, "store": None, "storage": None})


def now_tag() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
