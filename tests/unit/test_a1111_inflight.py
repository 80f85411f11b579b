"""Two ``run()`` calls in flight on the ``a1111`` runtime, against ``sdfleet runtime serve``, which
runs requests one at a time in arrival order like SD WebUI's queue lock: the next request waits
at the server while one runs; progress and interrupts go to the right job; a model switch waits
for the jobs in flight; another client's job is never interrupted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from fakes.servers import ServerThread, a1111_server, free_port
from sdfleet.errors import Interrupted, RuntimeFailure
from sdfleet.runtimes.a1111 import A1111Runtime
from sdfleet.runtimes.base import Job
from sdfleet.tasks import TaskParams, TaskType

# Steps of the tiny model, long enough to act while a job runs: 40 take half a second here on one
# torch thread, alone (tests/conftest.py); 12 took 0.16 s, and a loaded host no longer stretches
# them now that torch does not spin.
LONG = 40
_PATH = "/sdapi/v1/txt2img"

# Real servers with diffusers models: minutes on a busy 2-core machine.
pytestmark = pytest.mark.timeout(600)


class Events:
    """In order: each txt2img sent and answered (by prompt), each /interrupt and /options sent,
    and each progress report."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.answers: dict[str, Any] = {}

    async def request(self, request: httpx.Request) -> None:
        path = request.url.path
        if path == _PATH:
            self.log.append(("sent", json.loads(request.content)["prompt"]))
        elif request.method == "POST" and path in ("/sdapi/v1/interrupt", "/sdapi/v1/options"):
            self.log.append((path.rsplit("/", 1)[-1], request.content.decode()))

    async def response(self, response: httpx.Response) -> None:
        if response.request.url.path == _PATH:
            await response.aread()
            prompt = json.loads(response.request.content)["prompt"]
            self.answers[prompt] = response.json()
            self.log.append(("answered", prompt))

    def progress(self, name: str) -> Any:
        async def report(value: float) -> None:
            if value < 1.0:  # 1.0 comes with the answer, from run() itself
                self.log.append(("progress", name))

        return report

    def index(self, event: tuple[str, str]) -> int:
        return self.log.index(event)

    def where(self, kind: str) -> list[int]:
        return [i for i, (k, _) in enumerate(self.log) if k == kind]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = a1111_server(tmp_path_factory.mktemp("models"), free_port())
    yield srv
    srv.stop()


@pytest.fixture
async def events() -> Events:
    return Events()


@pytest.fixture
async def runtime(server: ServerThread, events: Events) -> AsyncIterator[A1111Runtime]:
    hooks = {"request": [events.request], "response": [events.response]}
    client = httpx.AsyncClient(base_url=server.url, timeout=600, event_hooks=hooks)
    rt = A1111Runtime(client, default_model="tiny-a", poll_s=0.02, ready_timeout_s=5)
    await rt.start()
    yield rt
    await rt.interrupt()  # a failed test leaves no job of ours running at the shared server
    await rt.aclose()


def job(name: str, steps: int = 2, model: str | None = None) -> Job:
    params = TaskParams(prompt=name, steps=steps, width=64, height=64, seed=5)
    return Job(name, TaskType.TEXT_TO_IMAGE, model, params)


async def until(events: Events, event: tuple[str, str]) -> None:
    for _ in range(12000):  # two minutes: a shared 2-core machine can be slow
        if event in events.log:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {event} in {events.log}")


async def started(events: Events, name: str) -> None:
    """Until ``name`` has reported progress (SD WebUI is running it)."""
    await until(events, ("progress", name))


async def sent(events: Events, name: str) -> None:
    await until(events, ("sent", name))


async def test_the_next_job_waits_at_the_server_and_progress_goes_to_the_running_one(
    runtime: A1111Runtime, events: Events
) -> None:
    # b long enough that a progress poll (every 20 ms) sees it run: 2 steps finished between two
    # polls once, on a loaded machine, and b reported no progress at all
    a, b = await asyncio.gather(
        runtime.run(job("a", LONG), events.progress("a")), runtime.run(job("b", 20), events.progress("b"))
    )
    assert len(a.images) == 1 and len(b.images) == 1
    # b was at the server while a ran: the GPU had the next job the moment a ended.
    assert events.index(("sent", "b")) < events.index(("answered", "a"))
    a_done = events.index(("answered", "a"))
    progress_a = [i for i, e in enumerate(events.log) if e == ("progress", "a")]
    progress_b = [i for i, e in enumerate(events.log) if e == ("progress", "b")]
    assert progress_a and max(progress_a) < a_done  # a's progress while a ran
    assert progress_b and min(progress_b) > a_done  # none of a's progress went to b


async def test_a_model_switch_waits_for_the_jobs_in_flight(runtime: A1111Runtime, events: Events) -> None:
    a, b, c = await asyncio.gather(
        runtime.run(job("on-a", LONG, model="tiny-a"), events.progress("on-a")),
        runtime.run(job("on-b", model="tiny-b"), events.progress("on-b")),
        runtime.run(job("on-b-again", model="tiny-b"), events.progress("on-b-again")),
    )
    assert [r.info["sd_model_name"] for r in (a, b, c)] == ["tiny-a", "tiny-b", "tiny-b"]
    switch = next(i for i, (k, body) in enumerate(events.log) if k == "options" and "tiny-b" in body)
    assert events.index(("answered", "on-a")) < switch < events.index(("sent", "on-b"))
    assert events.index(("sent", "on-b")) < events.index(("sent", "on-b-again")) and runtime.switches == 1


async def test_interrupting_the_queued_job_stops_it_when_it_starts(
    runtime: A1111Runtime, events: Events
) -> None:
    first = asyncio.create_task(runtime.run(job("first", LONG), events.progress("first")))
    # long, as "running" below: on a loaded host a short job may start and end between two of
    # the watcher's looks at SD WebUI, which then never sees it run (a clean clone failed so once)
    queued = asyncio.create_task(runtime.run(job("queued", 150), events.progress("queued")))
    await started(events, "first")
    await sent(events, "queued")
    await runtime.interrupt("queued")
    assert len((await first).images) == 1  # the running job was not touched
    with pytest.raises(Interrupted):
        await queued
    [interrupt] = events.where("interrupt")
    assert events.index(("answered", "first")) < interrupt < events.index(("answered", "queued"))
    assert events.answers["queued"]["images"] == []  # stopped at the server, not left to run


async def test_interrupting_the_running_job_leaves_the_queued_one(
    runtime: A1111Runtime, events: Events
) -> None:
    # SD WebUI's /interrupt stops whatever runs when it arrives: sent as "running" ends, it stops
    # "after" (which then fails to be retried, never passes as done). On a loaded host the first
    # progress report may come late in a run, so this one is long; the interrupt cuts it.
    running = asyncio.create_task(runtime.run(job("running", 150), events.progress("running")))
    after = asyncio.create_task(runtime.run(job("after"), events.progress("after")))
    await started(events, "running")
    await sent(events, "after")
    await runtime.interrupt("running")
    with pytest.raises(Interrupted):
        await running
    assert len((await after).images) == 1
    [interrupt] = events.where("interrupt")
    assert interrupt < events.index(("answered", "running"))
    assert events.answers["running"]["images"] == [] and len(events.answers["after"]["images"]) == 1


async def test_interrupt_all_and_the_job_not_yet_sent(runtime: A1111Runtime, events: Events) -> None:
    runs = [asyncio.create_task(runtime.run(job(f"j{i}", LONG), events.progress(f"j{i}"))) for i in range(2)]
    # j2 needs another checkpoint: it waits here until SD WebUI has none of our jobs.
    runs.append(asyncio.create_task(runtime.run(job("j2", model="tiny-b"), events.progress("j2"))))
    await started(events, "j0")
    await sent(events, "j1")
    await runtime.interrupt()
    for run in runs:
        with pytest.raises(Interrupted):
            await run
    assert ("sent", "j2") not in events.log and events.where("options") == [0]  # never sent, no switch
    assert len((await runtime.run(job("usable"), events.progress("usable"))).images) == 1


async def test_another_clients_job_is_never_interrupted(
    runtime: A1111Runtime, events: Events, server: ServerThread
) -> None:
    # The most steps a task may ask, nearly four times ours: on a loaded machine a short job could
    # end between being seen and ours being sent (pinning settings, the settled snapshot) plus the
    # quiet period below, and then ours runs and is interrupted, rightly.
    body = {"prompt": "theirs", "seed": 3, "width": 64, "height": 64, "steps": 150}
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as other:
        theirs = asyncio.create_task(other.post(_PATH, json=body))
        for _ in range(12000):  # until the server runs their job
            if (await other.get("/sdapi/v1/progress")).json()["state"]["job_count"]:
                break
            await asyncio.sleep(0.01)
        mine = asyncio.create_task(runtime.run(job("mine", LONG), events.progress("mine")))
        await sent(events, "mine")
        await runtime.interrupt("mine")
        await asyncio.sleep(0.3)  # polls while their job runs
        assert events.where("interrupt") == []
        answer = await theirs
        with pytest.raises(Interrupted):
            await mine
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1


async def test_a_job_stopped_by_someone_else_is_not_a_success(
    runtime: A1111Runtime, events: Events, server: ServerThread
) -> None:
    run = asyncio.create_task(runtime.run(job("stopped", LONG), events.progress("stopped")))
    await started(events, "stopped")
    async with httpx.AsyncClient(base_url=server.url) as other:  # SD WebUI answers such a job with
        assert (await other.post("/sdapi/v1/interrupt")).json() == {}  # 200 and half-made images
    # Retried either way: seen as someone else's interrupt by the progress watch, or, when the
    # answer came first, by the images missing from it.
    with pytest.raises(RuntimeFailure, match=r"interrupted"):
        await run
    assert events.where("interrupt") == []


async def test_a_job_caught_beginning_is_not_taken_for_the_state_before_it() -> None:
    """SD WebUI's ``State.begin`` sets the count, then the timestamp, then the job's name: a
    ``/progress`` read in between shows an active job without a name and maybe the previous job's
    timestamp. The snapshot a request is sent against waits that instant out, so another client's
    job that was just beginning is recorded as not ours (and never interrupted for ours)."""
    from fastapi import FastAPI

    reads = {"n": 0}
    app = FastAPI()

    @app.get("/sdapi/v1/progress")
    async def progress() -> dict[str, Any]:
        reads["n"] += 1
        beginning = reads["n"] <= 2
        state = {
            "job_count": -1 if beginning else 1,
            "job_timestamp": "20261202000000" if beginning else "20261202000001",
            "job": "" if beginning else "scripts_txt2img",
            "interrupted": False,
        }
        return {"progress": 0.0, "state": state}

    server = ServerThread(app, free_port()).start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            runtime = A1111Runtime(client)
            snap = await runtime._settled_snapshot()
    finally:
        server.stop()
    assert snap is not None and snap.job == "scripts_txt2img" and snap.timestamp == "20261202000001"
    assert reads["n"] == 3
