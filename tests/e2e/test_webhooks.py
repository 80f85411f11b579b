"""Task webhooks, end to end: a real receiver (uvicorn on 127.0.0.1) gets signed, filtered events;
terminal ones are retried through 5xx answers; refused URLs are a 422 at submit."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fleet_tools import task_events
from standardwebhooks import Webhook as StandardWebhook
from standardwebhooks import WebhookVerificationError

from conftest import Engine, StartFleet, fleet_settings, free_port
from sdfleet.errors import RuntimeFailure
from sdfleet.notify.webhook import WebhookNotifier, verify
from sdfleet.settings import QueueConfig, Settings, WebhookSettings
from sdfleet.tasks import EventType, Task, TaskEvent, TaskRecord, TaskState, Webhook

# flows of the fleet's own logic: redis and aws in `make test-slow` (tests/conftest.py)
pytestmark = [pytest.mark.timeout(90), pytest.mark.flow]

SECRET = "test-webhook-secret"
QUEUE = [QueueConfig(name="q", runtime="synthetic")]
RUNTIMES = {"synthetic": {"latency_s": 0.3, "progress_steps": 3}}
PARAMS = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3}


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> str:
        return self.headers.get("x-sdfleet-event", "")


@dataclass
class Receiver:
    """Records every request; answers ``answers[(path, event)]`` in turn, then 200; a 429 or 503
    with ``Retry-After: <retry_after>`` where that is set."""

    url: str = ""
    hits: list[Hit] = field(default_factory=list)
    answers: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    retry_after: str | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        key = (scope["path"], headers.get("x-sdfleet-event", ""))
        queued = self.answers.get(key)
        status = queued.pop(0) if queued else 200
        self.hits.append(Hit(scope["path"], headers, body, status))
        answer = [(b"content-type", b"text/plain")]
        if status in (429, 503) and self.retry_after is not None:
            answer.append((b"retry-after", self.retry_after.encode()))
        await send({"type": "http.response.start", "status": status, "headers": answer})
        await send({"type": "http.response.body", "body": b"ok"})

    def on(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    async def until(self, ok: Callable[[], bool], timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok():
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver never got there: {self.hits}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(rec, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    job = asyncio.create_task(server.serve())
    while not server.started:
        assert not job.done(), job
        await asyncio.sleep(0.02)
    rec.url = f"http://127.0.0.1:{port}"
    yield rec
    server.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(job, timeout=10)


def _settings(engine: Engine, models_dir: Path, *, allow_private: bool) -> Settings:
    settings = fleet_settings(engine, models_dir, QUEUE, runtimes=RUNTIMES)
    settings.webhook = WebhookSettings.model_validate(
        {"secret": SECRET, "allow_private": allow_private, "retry_backoff_s": 0.05, "max_retry_s": 10}
    )
    return settings


def _signed(hit: Hit, secret: str = SECRET) -> bool:
    """Both signatures hold: Standard Webhooks (checked by the ``standardwebhooks`` library's own
    verifier) and the earlier ``X-Sdfleet-Signature``."""
    StandardWebhook(secret.encode()).verify(hit.body, hit.headers)  # raises when it does not hold
    assert hit.headers["webhook-id"] == hit.headers["x-sdfleet-delivery"]
    ts, body = hit.headers["x-sdfleet-timestamp"], hit.body
    expected = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hit.headers["x-sdfleet-signature"] == f"sha256={expected}" and verify(
        secret, ts, body, hit.headers["x-sdfleet-signature"]
    )


async def test_subscribed_events_are_signed_and_terminal_ones_retried(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, receiver: Receiver
) -> None:
    rf = await start_fleet(QUEUE, settings=_settings(engine, models_dir, allow_private=True))
    receiver.answers[("/hook/ok", "succeeded")] = [500, 503]
    ok = {"params": PARAMS, "webhook": {"url": f"{receiver.url}/hook/ok", "events": ["started", "succeeded"]}}
    bad = {  # an input from a bucket the agent may not read: fails in the agent, not at the door
        "type": "image-to-image",
        "params": {**PARAMS, "init_images": ["s3://no-such-bucket/k.png"]},
        "webhook": {"url": f"{receiver.url}/hook/bad", "events": ["failed"]},
        "context": {"order": 7},
    }
    ids = []
    for body in (ok, bad):
        r = await rf.http.post("/v1/tasks", json=body)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    assert (await rf.wait(ids[0]))["state"] == "succeeded"
    assert (await rf.wait(ids[1]))["state"] == "failed"
    await receiver.until(
        lambda: any(h.status == 200 and h.event == "succeeded" for h in receiver.on("/hook/ok"))
    )
    await receiver.until(lambda: bool(receiver.on("/hook/bad")))

    hits = receiver.on("/hook/ok")
    assert [(h.event, h.status) for h in hits] == [
        ("started", 200),
        ("succeeded", 500),
        ("succeeded", 503),
        ("succeeded", 200),
    ]
    assert all(_signed(h) for h in hits)
    assert len({h.headers["x-sdfleet-delivery"] for h in hits[1:]}) == 1, "a retry keeps its delivery id"
    assert hits[0].headers["x-sdfleet-delivery"] != hits[1].headers["x-sdfleet-delivery"]
    done = json.loads(hits[-1].body)
    assert done["type"] == "succeeded" and done["task_id"] == ids[0] and done["schema"] == 1
    assert done["state"] == "succeeded" and len(done["image_urls"]) == 1
    assert json.loads(hits[0].body)["state"] == "running"

    [failed] = receiver.on("/hook/bad")  # not subscribed to started: only the failure comes
    assert failed.event == "failed" and failed.status == 200 and _signed(failed)
    note = json.loads(failed.body)
    assert note["error"]["code"] == "url_refused" and note["context"] == {"order": 7}


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
async def test_refused_webhook_url_is_422_at_submit(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, receiver: Receiver
) -> None:
    rf = await start_fleet(QUEUE, agents=[], settings=_settings(engine, models_dir, allow_private=False))
    for url, why in [
        ("http://169.254.169.254/latest/meta-data/", "cloud instance metadata"),
        (f"{receiver.url}/hook", "loopback"),
        ("ftp://example.com/hook", "scheme"),
        ("http://xn--zz.com/hook", "malformed host"),  # was a 500 (IDNAError)
    ]:
        r = await rf.http.post("/v1/tasks", json={"params": PARAMS, "webhook": {"url": url}})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "bad_webhook" and why in err["message"], err
    assert (await rf.http.get("/v1/tasks")).json()["tasks"] == []
    assert receiver.hits == []


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
async def test_a_webhook_host_the_resolver_cannot_look_up_now_is_503_at_submit(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "Try again" from the resolver (EAI_AGAIN) is an outage, not a bad URL: the client is told
    to retry (it was a 422, ``bad_webhook``, as if the URL were wrong). The resolver is faked for
    one name: no query leaves this machine."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.example":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    rf = await start_fleet(QUEUE, agents=[], settings=_settings(engine, models_dir, allow_private=False))
    r = await rf.http.post(
        "/v1/tasks", json={"params": PARAMS, "webhook": {"url": "https://hooks.example/h"}}
    )
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "dns_unavailable" and err["message"].endswith("retry later"), err
    assert (await rf.http.get("/v1/tasks")).json()["tasks"] == []


def _record(url: str, events: list[str]) -> TaskRecord:
    task = Task(params=PARAMS, webhook=Webhook.model_validate({"url": url, "events": events}))
    return TaskRecord(task=task, state=TaskState.SUCCEEDED)


def _event(record: TaskRecord, kind: EventType) -> TaskEvent:
    return TaskEvent(type=kind, task_id=record.id, tenant=record.tenant, state=record.state)


async def test_notify_never_waits_and_shutdown_drain_is_bounded(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.answers[("/down", "succeeded")] = [500] * 10_000
    notifier = WebhookNotifier(secret="", allow_private=True, backoff_s=0.05, max_retry_s=60, drain_s=0.5)
    down = _record(f"{receiver.url}/down", ["succeeded"])
    t0 = time.monotonic()
    await notifier.notify(down, _event(down, EventType.SUCCEEDED))
    assert time.monotonic() - t0 < 0.1, "delivery runs in the background"
    await receiver.until(lambda: len(receiver.on("/down")) >= 3)
    unsigned = receiver.on("/down")[0].headers
    assert "x-sdfleet-signature" not in unsigned and "webhook-signature" not in unsigned, (
        "no secret: unsigned"
    )
    with caplog.at_level(logging.WARNING, logger="sdfleet.notify.webhook"):
        t0 = time.monotonic()
        await notifier.aclose()
    assert time.monotonic() - t0 < 2
    assert any("shutting down" in r.getMessage() and down.id in r.getMessage() for r in caplog.records)
    # a retry already on the wire when it was cancelled may still reach the receiver: let it land
    # (under load it did, after the count, and read as a delivery after the close)
    await asyncio.sleep(0.2)
    count = len(receiver.on("/down"))
    await notifier.notify(down, _event(down, EventType.SUCCEEDED))  # closed: dropped, logged
    await asyncio.sleep(0.2)
    assert len(receiver.on("/down")) == count


async def test_a_receiver_that_asks_for_a_wait_gets_it(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """A 429 with ``Retry-After: 2``: the next try comes two seconds later, not after the 0.05 s
    backoff (which asked a receiver shedding load again at once, several times)."""
    receiver.answers[("/busy", "succeeded")] = [429]
    receiver.retry_after = "2"
    notifier = WebhookNotifier(secret="", allow_private=True, backoff_s=0.05, max_retry_s=60)
    try:
        busy = _record(f"{receiver.url}/busy", ["succeeded"])
        with caplog.at_level(logging.INFO, logger="sdfleet.notify.webhook"):
            await notifier.notify(busy, _event(busy, EventType.SUCCEEDED))
            await notifier.delivered(busy.id)
    finally:
        await notifier.aclose()
    assert [h.status for h in receiver.on("/busy")] == [429, 200]
    (retry,) = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert retry.args is not None and retry.args[-1] == 2.0, retry.getMessage()


async def test_client_errors_are_not_retried_and_intermediate_events_throttled(receiver: Receiver) -> None:
    notifier = WebhookNotifier(secret=SECRET, allow_private=True, backoff_s=0.01, throttle_s=0.5)
    receiver.answers[("/gone", "failed")] = [404, 500]
    gone = _record(f"{receiver.url}/gone", ["failed"])
    await notifier.notify(gone, _event(gone, EventType.FAILED))
    rec = _record(f"{receiver.url}/p", ["progress"])
    running = rec.model_copy(update={"state": TaskState.RUNNING})
    for _ in range(5):
        await notifier.notify(running, _event(running, EventType.PROGRESS))
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    await notifier.notify(running, _event(running, EventType.PROGRESS))
    await receiver.until(lambda: len(receiver.on("/p")) >= 2)
    await notifier.aclose()
    assert len(receiver.on("/p")) == 2, "five progress events within 0.5 s: one sent"
    assert [h.status for h in receiver.on("/gone")] == [404], "a 4xx other than 429 is final"


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
async def test_cancels_are_delivered(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, receiver: Receiver
) -> None:
    settings = _settings(engine, models_dir, allow_private=True)
    settings.fleet.runtimes = {"synthetic": {"latency_s": 20, "progress_steps": 40}}
    rf = await start_fleet(QUEUE, settings=settings)
    hook = {"url": f"{receiver.url}/hook/cancel", "events": ["cancelled"]}
    running = (await rf.http.post("/v1/tasks", json={"params": PARAMS, "webhook": hook})).json()["id"]
    await rf.wait(running, states=("running",))
    queued = (await rf.http.post("/v1/tasks", json={"params": PARAMS, "webhook": hook})).json()["id"]
    for task_id in (queued, running):
        r = await rf.http.post(f"/v1/tasks/{task_id}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    await receiver.until(lambda: len(receiver.on("/hook/cancel")) >= 2, timeout_s=30)
    got = {json.loads(h.body)["task_id"]: h for h in receiver.on("/hook/cancel")}
    assert set(got) == {running, queued}
    assert all(h.event == "cancelled" and _signed(h) for h in got.values())


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # the finish stage's rule, not the engine's
@pytest.mark.parametrize("ends", ["with images", "in a failure", "at a shutdown"])
async def test_a_cancel_the_watch_had_not_read_when_the_run_ended_is_delivered(
    start_fleet: StartFleet,
    engine: Engine,
    models_dir: Path,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
    ends: str,
) -> None:
    """The agent that interrupts a cancelled task tells its subscribers. A run that ended first
    (its images made, a failure, a SIGTERM drain) within ``agent.cancel_check_s`` of the cancel
    had its result refused and its message acked, or was requeued and released, and no one ever
    said ``cancelled``: the next agent that got the message dropped it as already started (after
    a failure, that agent told the cancel, one lease or retry delay later)."""
    caplog.set_level(logging.INFO, logger="sdfleet.agent.task")
    settings = _settings(engine, models_dir, allow_private=True)
    settings.fleet.runtimes = {"synthetic": {"latency_s": 30 if ends == "at a shutdown" else 0.2}}
    settings.agent.cancel_check_s = 60  # the cancel watch never reads it: the run ends first
    settings.agent.drain_s = 0.2
    api = await start_fleet(QUEUE, settings=settings, agents=[])
    agents = await start_fleet(QUEUE, settings=settings, with_api=False)
    runtime = agents.fleet.agents[0].parts.runtime
    run = runtime.run
    cancelled = asyncio.Event()

    async def run_or_fail(job: Any, progress: Any) -> Any:
        await asyncio.wait_for(cancelled.wait(), timeout=30)  # the run ends only after the cancel
        if ends == "in a failure":
            raise RuntimeFailure("the GPU fell off the bus")
        return await run(job, progress)

    runtime.run = run_or_fail  # type: ignore[method-assign]
    hook = {"url": f"{receiver.url}/hook/ends", "events": ["cancelled", "succeeded", "failed"]}
    task_id = (await api.http.post("/v1/tasks", json={"params": PARAMS, "webhook": hook})).json()["id"]
    await api.wait(task_id, states=("running",))
    assert (await api.http.post(f"/v1/tasks/{task_id}/cancel")).status_code == 200
    cancelled.set()
    if ends == "at a shutdown":
        await agents.stop()
    await receiver.until(lambda: len(receiver.on("/hook/ends")) >= 1, timeout_s=15)
    await asyncio.sleep(0.5)  # room for a second, wrong, notification
    assert [h.event for h in receiver.on("/hook/ends")] == ["cancelled"]
    assert (await api.wait(task_id))["state"] == "cancelled"
    (q,) = [v for v in (await api.http.get("/v1/queues")).json() if v["name"] == "q"]
    assert (q["visible"], q["in_flight"]) == (0, 0), q  # acked, not handed back
    events = task_events(caplog, task_id)
    assert events == ["received", "started", "cancelled"], events


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # the agent's rule, not the engine's
async def test_a_retried_task_cancelled_while_waiting_in_the_agent_is_delivered(
    start_fleet: StartFleet,
    engine: Engine,
    models_dir: Path,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task cancelled while queued is told by the agent that drops it, which went by "no attempt
    yet". A task whose first attempt failed (back to ``queued``, one attempt) and that was cancelled
    while it waited in an agent's ready pool behind busy runtime places was dropped at its start
    with no notification, and its message acked: no one said ``cancelled``."""
    caplog.set_level(logging.INFO, logger="sdfleet.agent.task")
    settings = _settings(engine, models_dir, allow_private=True)
    settings.agent.retry_delay_s = 1.0  # room to fill the runtime's two places first
    rf = await start_fleet(QUEUE, settings=settings)
    runtime = rf.fleet.agents[0].parts.runtime
    run = runtime.run
    free = asyncio.Event()
    calls: list[str] = []

    async def run_once_failing(job: Any, progress: Any) -> Any:
        calls.append(job.task_id)
        if calls.count(job.task_id) == 1 and job.task_id == task_id:
            raise RuntimeFailure("the GPU fell off the bus")
        await asyncio.wait_for(free.wait(), timeout=30)  # the blockers hold both places
        return await run(job, progress)

    runtime.run = run_once_failing  # type: ignore[method-assign]
    task_id = ""
    hook = {"url": f"{receiver.url}/hook/retried", "events": ["cancelled", "succeeded", "failed"]}
    task_id = (await rf.http.post("/v1/tasks", json={"params": PARAMS, "webhook": hook})).json()["id"]
    await receiver.until(lambda: "requeued" in task_events(caplog, task_id))
    blockers = [(await rf.http.post("/v1/tasks", json={"params": PARAMS})).json()["id"] for _ in range(2)]
    # the retry, in the pool
    await receiver.until(lambda: task_events(caplog, task_id).count("received") == 2)
    assert (await rf.http.post(f"/v1/tasks/{task_id}/cancel")).status_code == 200
    free.set()
    await receiver.until(lambda: len(receiver.on("/hook/retried")) >= 1, timeout_s=15)
    assert [h.event for h in receiver.on("/hook/retried")] == ["cancelled"]
    assert [(await rf.wait(b))["state"] for b in blockers] == ["succeeded"] * 2
    events = task_events(caplog, task_id)
    assert events == ["received", "started", "requeued", "received", "dropped"], events


async def test_unsigned_warning_once_and_only_when_a_task_asks(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """No secret: the warning waits for a task that asks for a webhook, then comes once per process
    however many agents (notifiers) it runs; building the agents' notifiers says nothing."""
    from sdfleet.build import webhook_notifier
    from sdfleet.notify import webhook

    webhook._warn_unsigned.cache_clear()
    unsigned = Settings(webhook=WebhookSettings(allow_private=True))
    with caplog.at_level(logging.WARNING):
        notifiers = [webhook_notifier(unsigned), webhook_notifier(unsigned)]
        plain = TaskRecord(task=Task(params=PARAMS), state=TaskState.SUCCEEDED)
        for n in notifiers:
            await n.notify(plain, _event(plain, EventType.SUCCEEDED))
        assert not [r for r in caplog.records if "WEBHOOK__SECRET" in r.getMessage()]
        for i, n in enumerate(notifiers * 2):
            hooked = _record(f"{receiver.url}/h{i}", ["succeeded"])
            await n.notify(hooked, _event(hooked, EventType.SUCCEEDED))
        await receiver.until(lambda: len(receiver.hits) == 4)
        for n in notifiers:
            await n.aclose()
    warned = [r for r in caplog.records if "WEBHOOK__SECRET" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING


async def test_standard_webhooks_secret_verifies_with_the_library(receiver: Receiver) -> None:
    """A ``whsec_`` secret (the Standard Webhooks form) signs with its decoded bytes: a receiver
    hands the very same string to ``standardwebhooks.Webhook``; a changed body or id fails."""
    secret = "whsec_" + base64.b64encode(b"thirty-two bytes of shared secret").decode()
    notifier = WebhookNotifier(secret=secret, allow_private=True, backoff_s=0.01)
    rec = _record(f"{receiver.url}/std", ["succeeded"])
    await notifier.notify(rec, _event(rec, EventType.SUCCEEDED))
    await receiver.until(lambda: bool(receiver.on("/std")))
    await notifier.aclose()
    [hit] = receiver.on("/std")
    payload = StandardWebhook(secret).verify(hit.body, hit.headers)
    assert payload["task_id"] == rec.id and payload["type"] == "succeeded"
    assert hit.headers["webhook-signature"].startswith("v1,")
    for tampered_body, headers in (
        (hit.body.replace(b"succeeded", b"failed"), hit.headers),
        (hit.body, {**hit.headers, "webhook-id": "another-delivery"}),
    ):
        with pytest.raises(WebhookVerificationError):
            StandardWebhook(secret).verify(tampered_body, headers)
    with pytest.raises(WebhookVerificationError):
        StandardWebhook("whsec_" + base64.b64encode(b"some other secret").decode()).verify(
            hit.body, hit.headers
        )
