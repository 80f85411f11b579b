"""A fleet whose engine loses replies at random: every task still ends with one result.

The API and the agent reach the engine (redis-server; moto for SNS, SQS, DynamoDB and S3) through
a ``LostReplyProxy`` that drops the reply to a share of requests after the server applied them,
as a connection reset does. The clients send those requests again (botocore, redis-py), so every
write may land twice and every read may be lost once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from conftest import Engine, RunningFleet, StartFleet
from lost_reply import LostReplyProxy, proxy_to, script_marker
from sdfleet.api.submit import CLAIM_TTL_S
from sdfleet.runtimes.base import Job, ProgressFn, RuntimeResult
from sdfleet.settings import QueueConfig
from sdfleet.storage import open_storage
from sdfleet.store import open_store
from sdfleet.store.backends import redis as redis_store

pytestmark = pytest.mark.timeout(180)

QUEUE = [QueueConfig(name="q", runtime="synthetic")]
TASKS = 24
RATE = 0.04
"""The share of requests whose reply is lost."""


@pytest.fixture(params=["redis", "aws"])
def engine(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> Iterator[Engine]:
    """Overrides the e2e ``engine``: Redis or AWS, reached through a ``LostReplyProxy``."""
    ns = f"lr{uuid.uuid4().hex[:8]}"  # the servers are the session's: a namespace of its own
    proxy = proxy_to(request.param, request, monkeypatch)
    if request.param == "redis":
        url = f"redis://127.0.0.1:{proxy.port}/0?prefix={ns}"
        chosen = Engine("redis", url, url, f"file://{tmp_path}/files")
    else:
        aws = f"aws://?prefix={ns}-&region=us-east-1"
        chosen = Engine("aws", aws, aws, f"s3://{ns}-out/results?create=true&region=us-east-1")
    with proxy:
        request.node.proxy = proxy
        yield chosen


async def test_every_task_has_one_result_though_replies_are_lost(
    start_fleet: StartFleet, engine: Engine, request: pytest.FixtureRequest
) -> None:
    proxy: LostReplyProxy = request.node.proxy
    # Each lost reply to a receive counts as a receive, as on SQS: max_receives is high enough
    # that none of these tasks goes to the dead-letter queue on lost replies alone.
    fleet = await start_fleet(QUEUE, runtimes={"synthetic": {"latency_s": 0.05}}, lease_s=6, max_receives=10)
    ids, views, runs = await _submit_and_wait(fleet, proxy, RATE, seed=7)

    assert [v["state"] for v in views] == ["succeeded"] * TASKS, views
    store, storage = open_store(engine.store_url), open_storage(engine.storage_url)
    try:
        for view in views:
            record = await store.get("default", view["id"])
            assert record is not None and record.result is not None
            # A receive whose preparing met a store call that failed past the client's retries
            # (redis-py does not retry a new connection's handshake) is released and counts as an
            # attempt, as each receive does; the runtime still ran the task once (below).
            assert record.attempts >= 1, record
            assert len(record.result.images) == 1, record.result
            for key in record.result.images:
                assert await storage.exists(key), key
        assert len((await store.list("default", limit=200))[0]) == TASKS, "one record per task"
        assert runs == dict.fromkeys(ids, 1), "each task ran once"
    finally:
        await store.aclose()
        await storage.aclose()


async def test_no_task_is_left_without_an_outcome_when_its_receives_run_out(
    start_fleet: StartFleet, engine: Engine, request: pytest.FixtureRequest
) -> None:
    """15 % of replies lost and two receives a task: some tasks' receives are all lost (or their
    preparing meets a store call that failed past the client's retries) and their messages go to
    the dead-letter queue. Each of those ends ``failed`` all the same (the agent's look at its
    dead letters: ``dead_lettered``; or its last receive: ``prepare_failed``), never left
    ``queued``; the others succeed; none runs twice. (Slow: about a minute on two cores.)"""
    proxy: LostReplyProxy = request.node.proxy
    fleet = await start_fleet(
        QUEUE, runtimes={"synthetic": {"latency_s": 0.05}}, lease_s=6, max_receives=2, dead_letter_check_s=0.5
    )
    ids, views, runs = await _submit_and_wait(fleet, proxy, 0.15, seed=1)
    outcomes = Counter((v["state"], (v["error"] or {}).get("code")) for v in views)
    assert set(outcomes) <= {
        ("succeeded", None),
        ("failed", "dead_lettered"),
        ("failed", "prepare_failed"),
    }, views
    assert all(runs[task_id] <= 1 for task_id in ids), runs
    assert outcomes[("succeeded", None)] >= TASKS // 2, outcomes


async def _submit_and_wait(
    fleet: RunningFleet, proxy: LostReplyProxy, rate: float, *, seed: int
) -> tuple[list[str], list[dict[str, Any]], Counter[str]]:
    """Submit ``TASKS`` tasks while ``rate`` of the replies are lost, and wait for each to end:
    their ids, their final views, and how often the runtime ran each."""
    runs: Counter[str] = Counter()
    runtime = fleet.fleet.agents[0].parts.runtime
    inner = runtime.run

    async def run(job: Job, progress: ProgressFn) -> RuntimeResult:
        runs[job.task_id] += 1
        return await inner(job, progress)

    runtime.run = run  # type: ignore[method-assign]
    proxy.lose_at_random(rate, seed=seed)
    ids = [f"lost-{n}" for n in range(TASKS)]
    for n, task_id in enumerate(ids):
        body = {"id": task_id, "params": {"prompt": f"p{n}", "width": 64, "height": 64}}
        r = await _answered(lambda body=body: fleet.http.post("/v1/tasks", json=body))
        assert r.status_code in (200, 202), r.text
    views = [await _finished(fleet.http, task_id) for task_id in ids]
    proxy.lose_at_random(0)
    assert proxy.lost >= 10, f"only {proxy.lost} replies lost: the test proves little"
    return ids, views, runs


async def _answered(call: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
    """``call()`` again while it answers "retry" as the README asks of clients: a ``503``, or a
    submit's ``409 id_busy`` (a submit of the id cut short by the engine holds its claim until
    ``CLAIM_TTL_S``). The same client id makes a repeated submit one task."""
    deadline = time.monotonic() + CLAIM_TTL_S + 15
    while True:
        r = await call()
        busy = r.status_code == 409 and r.json()["error"]["code"] == "id_busy"
        if not (r.status_code == 503 or busy) or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.2)


async def _finished(http: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = await _answered(lambda: http.get(f"/v1/tasks/{task_id}"))
        assert r.status_code == 200, r.text
        view: dict[str, Any] = r.json()
        if view["state"] in ("succeeded", "failed", "cancelled"):
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"{task_id} unfinished after 120 s")


async def test_a_delete_whose_reply_is_lost_is_done(
    start_fleet: StartFleet, engine: Engine, request: pytest.FixtureRequest
) -> None:
    """The record's delete landed, its reply was lost, the client sent it again and the store
    answered "not at that version": the task is gone all the same, which is a 204, not a 409."""
    proxy: LostReplyProxy = request.node.proxy
    fleet = await start_fleet(QUEUE, agents=[])
    warm, task_id = [
        (await fleet.http.post("/v1/tasks", json={"params": {"prompt": "p"}})).json()["id"] for _ in "ab"
    ]
    for cancelled in (warm, task_id):
        assert (await fleet.http.post(f"/v1/tasks/{cancelled}/cancel")).status_code == 200
    assert (await fleet.http.delete(f"/v1/tasks/{warm}")).status_code == 204  # Redis: script loaded
    proxy.lose_next(script_marker(redis_store._DELETE) if engine.name == "redis" else b"DeleteItem")
    r = await fleet.http.delete(f"/v1/tasks/{task_id}")
    assert proxy.lost == 1, "the reply was not lost: the test proves nothing"
    assert r.status_code == 204, r.text
    assert (await fleet.http.get(f"/v1/tasks/{task_id}")).status_code == 404
