"""The ``a1111`` runtime: the seed's path, a running SD WebUI (AUTOMATIC1111) over its HTTP API.

Two jobs may be in flight (``max_in_flight = 2``): while SD WebUI runs one, the next already waits
in its queue, so the GPU does not idle between requests. Requests leave in ``run()`` order, each
only once the previous one's body is sent, so SD WebUI queues them in that order; one sent while
SD WebUI has none of ours, only once SD WebUI has begun it (it reads and checks a request before it
takes its queue lock: two sent a moment apart to an idle SD WebUI may run in either order). A job
for another checkpoint waits until SD WebUI has none of our jobs, then switches (``POST /options``).

Progress is polled from ``/sdapi/v1/progress`` and goes to the job SD WebUI is running, and
``interrupt()`` stops the right one: ``/sdapi/v1/interrupt`` when it runs; a job still queued at SD
WebUI is interrupted the moment it starts (SD WebUI cannot drop a queued request); one not yet sent
is never sent. It never interrupts a job it did not start (see ``_a1111_flights``).

Input image URLs anywhere in the body go through the agent's guarded fetcher and are sent inline as
base64, so SD WebUI itself never fetches a client's URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from sdfleet.errors import InputFetchError, Interrupted, Reject, RuntimeFailure, input_failure
from sdfleet.guarded_http import InputFetcher, fetcher_from_options
from sdfleet.models.catalog import ModelCatalog
from sdfleet.runtimes._a1111_answer import result_of, timestamp_of
from sdfleet.runtimes._a1111_errors import classify
from sdfleet.runtimes._a1111_flights import Flight, Flights, Snapshot
from sdfleet.runtimes._a1111_lists import Lists, same_checkpoint
from sdfleet.runtimes._a1111_payload import CLIP_SKIP, ENDPOINTS, build_body, inline_urls
from sdfleet.runtimes._server_start import server_url, wait_for_server
from sdfleet.runtimes.base import Job, ProgressFn, RuntimeResult
from sdfleet.runtimes.unsupported import refuse_kind, refuse_oversized_prompts
from sdfleet.tasks import TaskType

log = logging.getLogger(__name__)
_TEXT_KEYS = ("prompt", "negative_prompt")
_GENERATE = (TaskType.TEXT_TO_IMAGE, TaskType.IMAGE_TO_IMAGE)
_BEGIN_POLL_S = 0.01
"""How often to look whether SD WebUI has begun a request sent while it had none of ours."""


class A1111Runtime:
    """Runs jobs on an SD WebUI reached through ``client`` (its ``base_url`` is the WebUI's root)."""

    name = "a1111"
    max_in_flight = 2

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        fetcher: InputFetcher | None = None,
        default_model: str | None = None,
        ready_timeout_s: float = 300.0,
        poll_s: float = 0.5,
    ) -> None:
        self.client = client
        self.fetcher = fetcher
        self.default_model = default_model
        self.ready_timeout_s = ready_timeout_s
        self.poll_s = poll_s
        self.switches = 0
        self._current: str | None = None
        self._lists = Lists(lambda path: self._call("GET", path))
        self._flights = Flights()
        self._order = asyncio.Lock()
        self._pinned: set[str] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False

    @classmethod
    def from_options(
        cls,
        *,
        catalog: ModelCatalog,
        options: Mapping[str, Any],
        default_model: str | None = None,
        cache_size: int = 2,
    ) -> A1111Runtime:
        """Options: ``url`` (the WebUI, default http://127.0.0.1:7860), ``timeout_s``, ``ready_timeout_s``,
        ``poll_s``, and the guarded fetcher's ``input_max_bytes``, ``input_timeout_s``,
        ``allow_private_inputs``."""
        url = server_url(options, "http://127.0.0.1:7860", "SD WebUI")
        timeout = httpx.Timeout(float(options.get("timeout_s", 600)), connect=10.0)
        return cls(
            httpx.AsyncClient(base_url=url, timeout=timeout, trust_env=False),
            fetcher=fetcher_from_options(options),
            default_model=default_model,
            ready_timeout_s=float(options.get("ready_timeout_s", 300)),
            poll_s=float(options.get("poll_s", 0.5)),
        )

    @property
    def loaded_model(self) -> str | None:
        """The WebUI's ``sd_model_checkpoint`` title, as last seen."""
        return self._current

    async def start(self) -> None:
        """Wait until the WebUI answers (backoff up to ``ready_timeout_s``), pin the settings jobs
        override (so that SD WebUI restores them), then load the default model."""
        options = await wait_for_server(
            "SD WebUI",
            str(self.client.base_url),
            lambda: self._call("GET", "/sdapi/v1/options"),
            self.ready_timeout_s,
        )
        self._current = options.get("sd_model_checkpoint")
        async with self._order:
            await self._pin({CLIP_SKIP}, options)
            if self.default_model is not None:
                await self._switch(await self._lists.title(self.default_model))

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        """Run one job; see ``Runtime.run``."""
        refuse_kind("a1111", job.type)
        refuse_oversized_prompts("a1111", job.type, job.params)  # a task no API saw
        endpoint = ENDPOINTS[job.type]
        body = await self._body(job)
        flight = Flight(job.task_id, job.type, progress)
        self._flights.waiting.append(flight)
        try:
            switch_s = await self._send(job, f"/sdapi/v1/{endpoint}", body, flight)
            assert flight.answer is not None
            data = await asyncio.shield(flight.answer)
        except asyncio.CancelledError:
            self._abandon(flight)
            raise
        except BaseException:
            self._flights.finish(flight, None)
            raise
        timestamp = timestamp_of(data)
        self._flights.finish(flight, timestamp)
        self._wake.set()  # the next request is the oldest now: check it at once
        self._check(job, flight)
        result = result_of(job, data, self._current)
        result.switch_s = switch_s
        await progress(1.0)
        return result

    async def interrupt(self, task_id: str | None = None) -> None:
        """Stop the job of ``task_id`` (None: all of ours); its ``run`` raises ``Interrupted``.
        Nothing is sent to SD WebUI unless one of our jobs is the one it is running."""
        targets = [f for f in self._flights.all() if task_id is None or f.task_id == task_id]
        for flight in targets:
            flight.cancel()
        if any(f.sent for f in targets):
            snap = await self._snapshot()
            if snap is not None:
                await self._on_snapshot(snap)

    async def aclose(self) -> None:
        self._closing = True
        self._wake.set()
        if self._watcher is not None:  # let it end its poll: a request cancelled mid-connect leaks
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.client.aclose()
        if self.fetcher is not None:
            await self.fetcher.aclose()

    # --- sending ---------------------------------------------------------------------------------

    async def _send(self, job: Job, path: str, body: dict[str, Any], flight: Flight) -> float:
        """Send in ``run()`` order, after a switch if the job needs one; seconds spent switching.
        The request's task is ``flight.answer``."""
        await self._until(flight, self._order.acquire(), undo=self._order.release)
        try:
            switch_s = await self._prepare(job, body, flight)
            before = await self._settled_snapshot()
            self._flights.mark_sent(flight, before)
            self._ensure_watcher()
            sent = asyncio.Event()

            async def trace(name: str, _: Any) -> None:
                if name == "http11.send_request_body.complete":
                    sent.set()

            flight.answer = asyncio.create_task(self._call("POST", path, body, trace=trace))
            flight.answer.add_done_callback(lambda _: sent.set())
            await sent.wait()  # SD WebUI has the whole request before the next one leaves
            if not flight.ahead:
                await self._until_begun(flight)
        finally:
            self._order.release()
        return switch_s

    async def _until_begun(self, flight: Flight) -> None:
        """Until SD WebUI runs a job that is not one it had when ``flight`` was sent, or has answered
        it: the next request may leave then. Not at all where ``/progress`` tells no job state."""
        assert flight.answer is not None
        while not flight.answer.done() and not flight.cancelled:
            snap = await self._snapshot()
            if snap is None or (snap.active and snap.job and snap.timestamp not in flight.not_mine):
                return
            await asyncio.sleep(_BEGIN_POLL_S)

    async def _until(
        self, flight: Flight, step: Awaitable[Any], undo: Callable[[], Any] | None = None
    ) -> None:
        """Wait for ``step`` unless ``flight`` is cancelled first (then ``Interrupted``; ``undo``
        reverts a step that completed anyway)."""
        work = asyncio.ensure_future(step)
        stop = asyncio.ensure_future(flight.stopped.wait())
        try:
            done, _ = await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if work in done:
            work.result()
            return
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        if undo is not None and not work.cancelled() and work.exception() is None:
            undo()
        raise Interrupted(f"task {flight.task_id} interrupted before it was sent")

    async def _prepare(self, job: Job, body: dict[str, Any], flight: Flight) -> float:
        """Switch checkpoint and pin new override keys, with none of our jobs at SD WebUI; seconds
        spent switching (0 when the checkpoint stays: only a real switch counts as one)."""
        title = await self._lists.title(job.model) if job.model is not None else None
        keys = set(body.get("override_settings") or {}) - self._pinned - {"sd_model_checkpoint"}
        if flight.cancelled:
            raise Interrupted(f"task {flight.task_id} interrupted before it was sent")
        if (title is None or same_checkpoint(title, self._current)) and not keys:
            return 0.0
        await self._until(flight, self._flights.drained())
        if keys:
            await self._pin(keys, await self._call("GET", "/sdapi/v1/options"))
        if title is None or same_checkpoint(title, self._current):
            return 0.0  # pinning settings is no model switch
        t0 = time.perf_counter()
        await self._switch(title)
        return time.perf_counter() - t0

    async def _switch(self, title: str) -> None:
        if same_checkpoint(title, self._current):
            return
        log.info("switching SD WebUI checkpoint %s -> %s", self._current, title)
        await self._call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": title})
        self._current = title
        self.switches += 1

    async def _pin(self, keys: set[str], options: Mapping[str, Any]) -> None:
        """Write the current value of settings that jobs override. SD WebUI restores an overridden
        setting after a job only if it is in its saved settings; on a fresh install it is not, and
        one job's override would stay for every later job (and other clients')."""
        known = {k: options[k] for k in keys if k in options}
        if known:
            await self._call("POST", "/sdapi/v1/options", known)
        self._pinned |= keys

    def _abandon(self, flight: Flight) -> None:
        """``run()`` was cancelled: SD WebUI may still have the request; stop it, forget it when it ends."""
        flight.cancel()
        self._wake.set()
        if flight.answer is None:
            self._flights.finish(flight, None)
            return

        def done(task: asyncio.Task[Any]) -> None:
            data = None if task.cancelled() or task.exception() is not None else task.result()
            self._flights.finish(flight, timestamp_of(data))

        flight.answer.add_done_callback(done)

    # --- watching --------------------------------------------------------------------------------

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """While SD WebUI has our jobs: progress to the running one, interrupts where asked."""
        while self._flights.sent and not self._closing:
            snap = await self._snapshot()
            if snap is not None:
                await self._on_snapshot(snap)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)

    async def _on_snapshot(self, snap: Snapshot) -> None:
        flight = self._flights.running(snap)
        if flight is None:
            return
        if snap.interrupted and not flight.cancelled:
            flight.hit = True  # SD WebUI clears the flag when a job begins: this job was stopped
            return
        if flight.cancelled:
            if flight.interruptible and not flight.interrupt_sent:
                flight.interrupt_sent = True
                with contextlib.suppress(RuntimeFailure, Reject):
                    await self._call("POST", "/sdapi/v1/interrupt")
                after = await self._snapshot()  # if the job ended meanwhile, it hit the next one
                if after is not None:
                    await self._on_snapshot(after)
            return
        value = min(snap.progress, 0.99)
        # A snapshot read while the job ran can arrive after its answer: a finished job reports
        # no more progress (its 1.0 comes with the answer).
        answered = flight.answer is not None and flight.answer.done()
        if value > flight.reported and not answered:
            flight.reported = value
            try:
                await flight.progress(value)
            except Exception:
                log.warning("progress callback failed", exc_info=True)

    async def _settled_snapshot(self, tries: int = 40) -> Snapshot | None:
        """A snapshot outside the instant a job begins: SD WebUI sets the job count, then the
        timestamp, then the job's name, so an active job without a name may still show the
        previous job's timestamp, which must not be what a request sent now takes as not its own."""
        snap = await self._snapshot()
        for _ in range(tries):
            if snap is None or not snap.active or snap.job:
                break
            await asyncio.sleep(0.025)
            snap = await self._snapshot()
        return snap

    async def _snapshot(self) -> Snapshot | None:
        try:
            data = await self._call("GET", "/sdapi/v1/progress", params={"skip_current_image": "true"})
        except (RuntimeFailure, Reject) as e:
            log.debug("progress poll failed: %s", e)
            return None
        return Snapshot.parse(data)

    # --- bodies and answers ----------------------------------------------------------------------

    async def _body(self, job: Job) -> dict[str, Any]:
        body = build_body(job)
        if job.type in _GENERATE and body.get("sampler_name"):
            body["sampler_name"] = await self._lists.sampler(str(body["sampler_name"]))
        if job.type in _GENERATE and body.get("scheduler"):
            body["scheduler"] = await self._lists.scheduler(str(body["scheduler"]))
        try:
            return {k: v if k in _TEXT_KEYS else await inline_urls(v, self._fetch) for k, v in body.items()}
        except InputFetchError as e:
            raise input_failure(e) from e

    async def _fetch(self, url: str) -> bytes:
        if self.fetcher is None:
            raise InputFetchError(f"no input fetcher: cannot fetch {url}", code="url_refused")
        return await self.fetcher.fetch(url)

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        trace: Any = None,
    ) -> Any:
        extensions = {"trace": trace} if trace is not None else None
        try:
            resp = await self.client.request(method, path, json=body, params=params, extensions=extensions)
        except httpx.TransportError as e:
            raise RuntimeFailure(f"SD WebUI unreachable at {self.client.base_url}: {e!r}") from e
        if resp.status_code >= 400:
            raise classify(path, resp)
        try:
            return resp.json()
        except ValueError as e:
            raise RuntimeFailure(f"SD WebUI {path} answered non-JSON: {resp.text[:200]}") from e

    def _check(self, job: Job, flight: Flight) -> None:
        if flight.cancelled:
            raise Interrupted(f"task {job.task_id} interrupted")
        if flight.hit:
            # An interrupt (another client's, or ours meant for the job before) reached this job:
            # its images are half-made. Run it again.
            raise RuntimeFailure(f"SD WebUI interrupted task {job.task_id} (not asked by it); retry")
