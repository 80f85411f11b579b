"""Two ``run()`` calls in flight on the ``a1111`` runtime, against ``sdfleet runtime serve``, which
runs requests one at a time in arrival order like SD WebUI's queue lock: the next request waits
at the server while one runs; progress and interrupts go to the right job; a model switch waits
for the jobs in flight; another client's job is never interrupted.

What a test needs to happen while a job runs (the runtime's watcher seeing it, an interrupt
landing in it) must not depend on how fast the host is: clean clones on a loaded 2-core machine
saw jobs of 20, 40 and 150 steps start and end between two of the watcher's looks. So the server
holds a job at its first step until the test's condition is met (``Holds``); the runtime and the
server run as they do anywhere else.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from fakes.servers import ServerThread, free_port, tiny_catalog
from sdfleet.errors import Interrupted, RuntimeFailure
from sdfleet.models import ModelCatalog
from sdfleet.runtimes._diffusers_control import RunControl
from sdfleet.runtimes.a1111 import A1111Runtime
from sdfleet.runtimes.base import Job, ProgressFn, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType

# Steps of the tiny model for a job nothing holds: half a second here on one torch thread, alone
# (tests/conftest.py). A held job needs 3: it is held at the first, an interrupt stops it at the next.
LONG = 40
HELD = 4
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


class Holds:
    """Jobs the server holds at their first denoising step (its progress already at ``/progress``)
    until a condition is met, by prompt; two minutes at most, then the job goes on and the test's
    own assertions say what did not happen."""

    def __init__(self) -> None:
        self.until: dict[str, Callable[[RunControl], bool]] = {}
        self.prompts: dict[str, str] = {}
        """The server's task id of each job → its prompt."""
        self.timed_out: list[str] = []
        """Prompts of the jobs held until the deadline: the test failed to make its condition."""

    def hold(self, prompt: str, until: Callable[[RunControl], bool]) -> None:
        self.until[prompt] = until

    def at_step(self, ctl: RunControl) -> None:
        """In the worker thread, once per step."""
        for task_id in ctl.task_ids:
            prompt = self.prompts.get(task_id, "")
            until = self.until.pop(prompt, None)
            deadline = time.monotonic() + 120
            while until is not None and not until(ctl):
                if time.monotonic() > deadline:
                    self.timed_out.append(prompt)
                    break
                time.sleep(0.005)


def interrupted(ctl: RunControl) -> bool:
    """Until the server has stopped the job (SD WebUI's /interrupt reached it)."""
    return ctl.stop.is_set()


class _HeldRuntime(DiffusersRuntime):
    """The diffusers runtime, telling ``holds`` which prompt each of the server's jobs is."""

    def __init__(self, holds: Holds, catalog: ModelCatalog) -> None:
        super().__init__(catalog, default_model="tiny-a", device="cpu")
        self.holds = holds

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        self.holds.prompts[job.task_id] = job.params.prompt
        return await super().run(job, progress)


@pytest.fixture(scope="module")
def module_holds() -> Iterator[Holds]:
    holds = Holds()
    report = RunControl.report

    def report_and_hold(ctl: RunControl, value: float) -> None:
        report(ctl, value)
        holds.at_step(ctl)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunControl, "report", report_and_hold)
        yield holds


@pytest.fixture
def holds(module_holds: Holds) -> Iterator[Holds]:
    yield module_holds
    module_holds.until.clear()  # a failed test's holds never reach the next test's jobs
    timed_out, module_holds.timed_out = module_holds.timed_out, []
    assert not timed_out, f"jobs held until the deadline: {timed_out}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, module_holds: Holds) -> Iterator[ServerThread]:
    from sdfleet.runtime_server import create_app

    catalog = tiny_catalog(tmp_path_factory.mktemp("models"))
    runtime = _HeldRuntime(module_holds, catalog)
    srv = ServerThread(create_app(runtime, catalog), free_port()).start()
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
    runtime: A1111Runtime, events: Events, holds: Holds
) -> None:
    holds.hold("a", lambda _: ("progress", "a") in events.log and ("sent", "b") in events.log)
    holds.hold("b", lambda _: ("progress", "b") in events.log)
    a, b = await asyncio.gather(
        runtime.run(job("a", HELD), events.progress("a")), runtime.run(job("b", HELD), events.progress("b"))
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
    runtime: A1111Runtime, events: Events, holds: Holds
) -> None:
    asked = threading.Event()
    holds.hold("first", lambda _: asked.is_set())  # the interrupt is asked while "queued" waits
    holds.hold("queued", interrupted)  # the watcher sees it start, however briefly it would run
    first = asyncio.create_task(runtime.run(job("first", HELD), events.progress("first")))
    queued = asyncio.create_task(runtime.run(job("queued", HELD), events.progress("queued")))
    await started(events, "first")
    await sent(events, "queued")
    await runtime.interrupt("queued")
    asked.set()
    assert len((await first).images) == 1  # the running job was not touched
    with pytest.raises(Interrupted):
        await queued
    [interrupt] = events.where("interrupt")
    assert events.index(("answered", "first")) < interrupt < events.index(("answered", "queued"))
    assert events.answers["queued"]["images"] == []  # stopped at the server, not left to run


async def test_interrupting_the_running_job_leaves_the_queued_one(
    runtime: A1111Runtime, events: Events, holds: Holds
) -> None:
    # SD WebUI's /interrupt stops whatever runs when it arrives: sent as "running" ends, it would
    # stop "after" (which then fails to be retried, never passes as done). Held until the interrupt
    # reaches it, "running" is the job it stops.
    holds.hold("running", interrupted)
    running = asyncio.create_task(runtime.run(job("running", HELD), events.progress("running")))
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


async def test_interrupt_all_and_the_job_not_yet_sent(
    runtime: A1111Runtime, events: Events, holds: Holds
) -> None:
    holds.hold("j0", interrupted)
    holds.hold("j1", interrupted)
    runs = [asyncio.create_task(runtime.run(job(f"j{i}", HELD), events.progress(f"j{i}"))) for i in range(2)]
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
    runtime: A1111Runtime, events: Events, server: ServerThread, holds: Holds
) -> None:
    looked = threading.Event()
    holds.hold("theirs", lambda _: looked.is_set())  # their job runs until we have looked
    body = {"prompt": "theirs", "seed": 3, "width": 64, "height": 64, "steps": HELD}
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as other:
        theirs = asyncio.create_task(other.post(_PATH, json=body))
        for _ in range(12000):  # until the server runs their job
            if (await other.get("/sdapi/v1/progress")).json()["state"]["job_count"]:
                break
            await asyncio.sleep(0.01)
        mine = asyncio.create_task(runtime.run(job("mine", HELD), events.progress("mine")))
        await sent(events, "mine")
        await runtime.interrupt("mine")
        await asyncio.sleep(0.3)  # polls while their job runs
        assert events.where("interrupt") == []
        looked.set()
        answer = await theirs
        with pytest.raises(Interrupted):
            await mine
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1


async def test_a_job_stopped_by_someone_else_is_not_a_success(
    runtime: A1111Runtime, events: Events, server: ServerThread, holds: Holds
) -> None:
    holds.hold("stopped", interrupted)
    run = asyncio.create_task(runtime.run(job("stopped", HELD), events.progress("stopped")))
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


def _sd_webui_checking_first(slow: str) -> tuple[Any, list[str]]:
    """An SD WebUI in what this depends on: a request is read and checked before it takes the queue
    lock (``slow``'s checks take 0.3 s: a large body), ``/progress`` shows the job that holds it."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    lock, ran = asyncio.Lock(), []
    state: dict[str, Any] = {"job_count": 0, "job": "", "job_timestamp": "0", "interrupted": False}
    blank = io.BytesIO()
    Image.new("RGB", (8, 8)).save(blank, format="PNG")

    async def txt2img(request: Request) -> JSONResponse:
        body = await request.json()
        if body["prompt"] == slow:
            await asyncio.sleep(0.3)
        async with lock:
            ran.append(body["prompt"])
            stamp = f"2026120700000{len(ran)}"
            state.update(job_count=1, job="scripts_txt2img", job_timestamp=stamp)
            await asyncio.sleep(0.2)
            state.update(job_count=0, job="")
        info = {"seed": body["seed"], "job_timestamp": stamp}
        image = base64.b64encode(blank.getvalue()).decode()
        return JSONResponse({"images": [image], "parameters": body, "info": json.dumps(info)})

    async def progress(_: Request) -> JSONResponse:
        return JSONResponse({"progress": 0.5 if state["job_count"] else 0.0, "state": dict(state)})

    async def options(_: Request) -> JSONResponse:
        return JSONResponse(
            {"sd_model_checkpoint": "fake.safetensors [deadbeef]", "CLIP_stop_at_last_layers": 1}
        )

    routes = [
        Route("/sdapi/v1/txt2img", txt2img, methods=["POST"]),
        Route("/sdapi/v1/progress", progress),
        Route("/sdapi/v1/options", options, methods=["GET", "POST"]),
    ]
    return Starlette(routes=routes), ran


async def test_two_requests_to_an_idle_server_run_in_run_order() -> None:
    """Sent a moment apart to an idle SD WebUI, a request whose checks take longer would run after
    the next one, whose progress and interrupts would then go to it (a clean clone's run of the
    tests above saw it). The next request leaves once SD WebUI has begun the first."""
    app, ran = _sd_webui_checking_first(slow="first")
    server = ServerThread(app, free_port()).start()
    events = Events()
    hooks = {"request": [events.request], "response": [events.response]}
    client = httpx.AsyncClient(base_url=server.url, timeout=60, event_hooks=hooks)
    runtime = A1111Runtime(client, poll_s=0.02, ready_timeout_s=5)
    try:
        await runtime.start()
        first = asyncio.create_task(runtime.run(job("first"), events.progress("first")))
        second = asyncio.create_task(runtime.run(job("second"), events.progress("second")))
        results = await asyncio.gather(first, second)
    finally:
        await runtime.aclose()
        server.stop()
    assert ran == ["first", "second"] and all(len(r.images) == 1 for r in results)
    # the second still waited at the server while the first ran: the GPU had it at once
    assert events.index(("sent", "second")) < events.index(("answered", "first"))
    assert ("progress", "second") not in events.log[: events.index(("answered", "first"))]
