"""The ``comfyui`` runtime: ``pipeline`` tasks (a ComfyUI workflow in API format) on a ComfyUI server.

Input images named by URL in ``LoadImage`` nodes are fetched through the agent's guarded fetcher and
uploaded with ``POST /upload/image`` under content-addressed names (``input/sdfleet/<day>/<sha256>.png``);
the workflow is queued with ``POST /prompt`` under a prompt id chosen here and the runtime's
``client_id``; progress and the end of the run come over the runtime's one ``/ws`` socket
(``_comfyui_events``); results are read from ``/history/{prompt_id}`` and ``/view``.

Up to ``max_in_flight`` runs may be outstanding at once: each queues its own prompt, so the next
one already waits in ComfyUI's queue when the running one ends. ``interrupt(task_id)`` deletes a
queued prompt (``POST /queue {"delete"}``) and interrupts a running one by its id; it never sends
an ``/interrupt`` without a prompt id (ComfyUI would stop whatever runs, another client's included).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
from collections.abc import Mapping
from typing import Any, NoReturn

import httpx

from sdfleet.errors import InputFetchError, Interrupted, Reject, RuntimeFailure, input_failure
from sdfleet.guarded_http import InputFetcher, fetcher_from_options
from sdfleet.models.catalog import ModelCatalog
from sdfleet.runtimes._comfyui_api import ComfyAPI, join_lines
from sdfleet.runtimes._comfyui_events import GONE, LOST, RECONCILE, EventStream, PromptWatch
from sdfleet.runtimes._server_start import server_url, wait_for_server
from sdfleet.runtimes.base import Job, ProgressFn, RuntimeResult
from sdfleet.runtimes.unsupported import refuse_kind

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 10.0
"""How long a cancelled ``run`` spends telling ComfyUI to drop its prompt before it gives up."""


class ComfyUIRuntime:
    """Runs workflow jobs on the ComfyUI at ``client.base_url``."""

    name = "comfyui"
    max_in_flight = 2

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        fetcher: InputFetcher | None = None,
        ready_timeout_s: float = 300.0,
        history_wait_s: float = 30.0,
        reconnect_s: float = 10.0,
    ) -> None:
        self.client = client
        self.fetcher = fetcher
        self.ready_timeout_s = ready_timeout_s
        self.history_wait_s = history_wait_s
        self.api = ComfyAPI(client)
        self.events = EventStream(client.base_url, reconnect_s=reconnect_s)

    @classmethod
    def from_options(
        cls,
        *,
        catalog: ModelCatalog,
        options: Mapping[str, Any],
        default_model: str | None = None,
        cache_size: int = 2,
    ) -> ComfyUIRuntime:
        """Options: ``url`` (default http://127.0.0.1:8188), ``timeout_s``, ``ready_timeout_s``,
        ``history_wait_s``, ``reconnect_s`` and the guarded fetcher's ``input_max_bytes``,
        ``input_timeout_s``, ``allow_private_inputs``."""
        url = server_url(options, "http://127.0.0.1:8188", "ComfyUI")
        fetcher = fetcher_from_options(options)
        timeout = httpx.Timeout(float(options.get("timeout_s", 60)), connect=10.0)
        client = httpx.AsyncClient(base_url=url, timeout=timeout, trust_env=False)
        return cls(
            client,
            fetcher=fetcher,
            ready_timeout_s=float(options.get("ready_timeout_s", 300)),
            history_wait_s=float(options.get("history_wait_s", 30)),
            reconnect_s=float(options.get("reconnect_s", 10)),
        )

    @property
    def loaded_model(self) -> str | None:
        return None  # the workflow's own loader nodes choose the checkpoint

    async def start(self) -> None:
        """Wait until ComfyUI answers ``/system_stats`` (backoff up to ``ready_timeout_s``)."""
        probe = functools.partial(self.api.call, "GET", "/system_stats")
        await wait_for_server("ComfyUI", str(self.client.base_url), probe, self.ready_timeout_s)

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        """Queue the workflow, follow it over the websocket, return its saved images."""
        refuse_kind("comfyui", job.type)
        if not job.params.workflow:
            raise Reject("the comfyui runtime runs 'pipeline' tasks with a workflow", code="unsupported_task")
        w = self.events.watch(job.task_id)
        try:
            workflow = await self._upload_inputs(copy.deepcopy(job.params.workflow))
            await self.events.ensure_open()
            await self._queue(w, workflow)
            entry = await self._follow(w, progress)
            images = await self._images(w.prompt_id, entry)
        except asyncio.CancelledError:
            # The caller gave up (its timeout, shutdown): nobody wants this prompt any more.
            if w.sent:
                cancel = asyncio.shield(self.api.cancel_quietly(w.prompt_id))
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(cancel, CANCEL_WAIT_S)
            raise
        finally:
            self.events.unwatch(w)
        await progress(1.0)
        run_s = _run_s(entry)
        info = {"runtime": self.name, "prompt_id": w.prompt_id, "run_s": run_s}
        return RuntimeResult(images=images, info=info, run_s=run_s)

    async def interrupt(self, task_id: str | None = None) -> None:
        """Stop the prompts of ``task_id`` (None: every prompt of this runtime): queued ones are
        deleted, a running one is interrupted by its id; their runs raise ``Interrupted``. Prompts
        this runtime did not queue are never touched."""
        targets = [w for w in self.events.watches.values() if task_id in (None, w.task_id)]
        for w in targets:
            w.interrupted = True
        queued = [w for w in targets if w.queued]
        if queued:
            await self._stop(queued)

    async def aclose(self) -> None:
        await self.events.aclose()
        await self.client.aclose()
        if self.fetcher is not None:
            await self.fetcher.aclose()

    async def _stop(self, watches: list[PromptWatch]) -> None:
        try:
            gone = await self.api.cancel([w.prompt_id for w in watches])
        except (RuntimeFailure, Reject) as e:
            log.warning("could not stop ComfyUI prompts %s: %s", [w.prompt_id for w in watches], e)
            return
        for w in watches:
            if w.prompt_id in gone:
                w.events.put_nowait((GONE, {}))  # deleted before it ran: no message will come

    async def _upload_inputs(self, workflow: dict[str, Any]) -> dict[str, Any]:
        names: dict[str, str] = {}
        for node in workflow.values():
            if not isinstance(node, dict) or node.get("class_type") != "LoadImage":
                continue
            inputs = node.get("inputs") or {}
            image = inputs.get("image")
            if isinstance(image, str) and image[:8].lower().startswith(
                ("http://", "https://", "data:", "s3://")
            ):
                if image not in names:
                    names[image] = await self.api.upload(await self._fetch(image))
                inputs["image"] = names[image]
        return workflow

    async def _fetch(self, url: str) -> bytes:
        if self.fetcher is None:
            raise Reject(f"no input fetcher: cannot fetch {url}", code="url_refused")
        try:
            return await self.fetcher.fetch(url)
        except InputFetchError as e:
            raise input_failure(e) from e

    async def _queue(self, w: PromptWatch, workflow: dict[str, Any]) -> None:
        if w.interrupted:
            raise Interrupted(f"task {w.task_id} interrupted before its prompt was queued")
        while not w.events.empty():  # a socket loss before the prompt existed concerns it not
            w.events.get_nowait()
        w.sent = True
        prompt_id, left_out = await self.api.queue(workflow, w.prompt_id, self.events.client_id)
        w.queued = True
        if prompt_id != w.prompt_id:  # a ComfyUI that picks its own ids: ask what was missed
            self.events.rekey(w, prompt_id)
            w.events.put_nowait((RECONCILE, {}))
        if left_out:
            await self.api.cancel_quietly(prompt_id)
            head = "ComfyUI would run only part of the workflow (outputs with invalid nodes are left out)"
            raise Reject(join_lines(head, left_out), code="invalid_workflow")
        if w.interrupted:  # interrupt() came while the prompt was being queued
            await self._stop([w])

    async def _follow(self, w: PromptWatch, progress: ProgressFn) -> dict[str, Any]:
        """Wait for the end of the prompt; returns its ``/history`` entry."""
        while True:
            kind, data = await w.events.get()
            if kind == "progress":
                if data.get("max"):
                    await progress(min(0.99, float(data["value"]) / float(data["max"])))
                continue
            entry = await self._settle(w, kind, data)
            if entry is not None:
                return entry

    async def _settle(self, w: PromptWatch, kind: str, data: dict[str, Any]) -> dict[str, Any] | None:
        """The history entry once ``kind`` ends the prompt well; raises when it ends badly; None
        while it goes on."""
        if kind in ("execution_interrupted", GONE):
            raise Interrupted(f"ComfyUI prompt {w.prompt_id} interrupted")
        if kind == "execution_error":
            raise _execution_error(data)
        if kind == LOST:
            raise RuntimeFailure(f"lost ComfyUI's websocket during prompt {w.prompt_id}: {data.get('error')}")
        if kind == "execution_success" or (kind == "executing" and data.get("node") is None):
            # ComfyUI announces success before it writes /history: wait for the entry
            return self._outcome(w, await self.api.wait_history(w.prompt_id, self.history_wait_s))
        if kind == RECONCILE:
            return await self._reconcile(w)
        return None

    async def _reconcile(self, w: PromptWatch) -> dict[str, Any] | None:
        """After messages may have been missed: the outcome from ``/history``, None while queued."""
        entry = await self.api.history(w.prompt_id)
        if entry is None and not await self.api.is_queued(w.prompt_id):
            entry = await self.api.history(w.prompt_id)  # it may have ended between the two calls
            if entry is None and not w.interrupted:
                raise RuntimeFailure(f"ComfyUI prompt {w.prompt_id} left the queue without a result")
            if entry is None:
                raise Interrupted(f"ComfyUI prompt {w.prompt_id} interrupted")
        return None if entry is None else self._outcome(w, entry)

    def _outcome(self, w: PromptWatch, entry: dict[str, Any]) -> dict[str, Any]:
        status = entry.get("status") or {}
        for kind, data in status.get("messages") or []:
            if kind in ("execution_error", "execution_interrupted"):
                self._raise_for(w, kind, data)
        if w.interrupted:  # it ended before the interrupt could stop it; we asked, so it is stopped
            raise Interrupted(f"ComfyUI prompt {w.prompt_id} interrupted")
        return entry

    def _raise_for(self, w: PromptWatch, kind: str, data: dict[str, Any]) -> NoReturn:
        if kind == "execution_error":
            raise _execution_error(data)
        raise Interrupted(f"ComfyUI prompt {w.prompt_id} interrupted")

    async def _images(self, prompt_id: str, entry: dict[str, Any]) -> list[bytes]:
        outputs = entry.get("outputs") or {}
        # "images" (SaveImage, core's animated WebP/video savers), "gifs" and "videos" (VideoHelperSuite
        # and others): the agent stores each file under its real type.
        refs = [
            i
            for out in outputs.values()
            if isinstance(out, dict)
            for key in OUTPUT_KEYS
            for i in out.get(key) or []
            if isinstance(i, dict)
        ]
        saved = [ref for ref in refs if ref.get("type") == "output"]
        if not saved and refs:
            raise Reject(
                "the workflow's only images are previews (type 'temp', e.g. PreviewImage), which ComfyUI "
                "does not keep: save them with a SaveImage node",
                code="no_saved_outputs",
            )
        if not saved:
            kinds = sorted({key for out in outputs.values() if isinstance(out, dict) for key in out})
            found = f" (its outputs: {', '.join(kinds)})" if kinds else ""
            raise Reject(
                f"ComfyUI prompt {prompt_id} saved no images{found}: the workflow needs a SaveImage node",
                code="no_saved_outputs",
            )
        return [await self.api.view(ref) for ref in saved]


OUTPUT_KEYS = ("images", "gifs", "videos")


def _run_s(entry: Mapping[str, Any]) -> float | None:
    """Seconds ComfyUI spent on the prompt (``execution_start`` to its end, from the timestamps its
    history keeps), without the time it waited in the queue; None if unknown."""
    stamps = {
        kind: data.get("timestamp")
        for kind, data in (entry.get("status") or {}).get("messages") or []
        if isinstance(data, Mapping)
    }
    start, end = stamps.get("execution_start"), stamps.get("execution_success")
    if isinstance(start, int | float) and isinstance(end, int | float):
        return max(0.0, (end - start) / 1000)
    return None


def _execution_error(data: Mapping[str, Any]) -> Exception:
    text = f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message')}"
    if "OutOfMemory" in str(data.get("exception_type")):
        return RuntimeFailure(f"ComfyUI ran out of memory in {text}")
    return Reject(f"ComfyUI workflow failed in {text}", code="workflow_error")
