"""The ``a1111`` runtime: the seed's path, a running SD WebUI (AUTOMATIC1111) over its HTTP API.

Checkpoints switch through ``POST /sdapi/v1/options`` only when the job's differs from the loaded one;
progress is polled from ``/sdapi/v1/progress`` while a call runs; ``interrupt()`` posts
``/sdapi/v1/interrupt``. Input image URLs anywhere in the body go through the agent's guarded
fetcher and are sent inline as base64, so SD WebUI itself never fetches a client's URL.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from sdfleet.errors import InputFetchError, Interrupted, ModelLoadError, Reject, RuntimeFailure
from sdfleet.guarded_http import InputFetcher, fetcher_from_options
from sdfleet.models.catalog import ModelCatalog
from sdfleet.runtimes._a1111_payload import ENDPOINTS, build_body, inline_urls
from sdfleet.runtimes.base import Job, ProgressFn, RuntimeResult
from sdfleet.tasks import TaskType

log = logging.getLogger(__name__)
_TEXT_KEYS = ("prompt", "negative_prompt")


def _message(resp: httpx.Response) -> str:
    """SD WebUI's own words: ``detail`` / ``errors`` of its error body, else the text."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("errors") or body.get("error")
        return detail if isinstance(detail, str) else json.dumps(detail)[:500]
    return str(body)[:500]


def _matches(name: str, item: Mapping[str, Any]) -> bool:
    bare = name.rsplit(" [", 1)[0] if name.endswith("]") else name
    filename = Path(str(item.get("filename", ""))).name
    candidates = {str(item.get("title", "")), str(item.get("model_name", "")), filename, Path(filename).stem}
    return name in candidates or bare in candidates or Path(bare).stem in candidates


class A1111Runtime:
    """Runs jobs on an SD WebUI reached through ``client`` (its ``base_url`` is the WebUI's root)."""

    name = "a1111"
    max_in_flight = 1

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
        self._models: list[dict[str, Any]] = []
        self._lock = asyncio.Lock()
        self._interrupted = False
        self._running: str | None = None

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
        url = str(options.get("url", "http://127.0.0.1:7860")).rstrip("/")
        timeout = httpx.Timeout(float(options.get("timeout_s", 600)), connect=10.0)
        fetcher = fetcher_from_options(options)
        return cls(
            httpx.AsyncClient(base_url=url, timeout=timeout, trust_env=False),
            fetcher=fetcher,
            default_model=default_model,
            ready_timeout_s=float(options.get("ready_timeout_s", 300)),
            poll_s=float(options.get("poll_s", 0.5)),
        )

    @property
    def loaded_model(self) -> str | None:
        """The WebUI's ``sd_model_checkpoint`` title, as last seen."""
        return self._current

    async def start(self) -> None:
        """Wait until the WebUI answers (backoff up to ``ready_timeout_s``), then load the default model."""
        deadline = time.monotonic() + self.ready_timeout_s
        delay = 0.1
        while True:
            try:
                options = await self._call("GET", "/sdapi/v1/options")
                break
            except RuntimeFailure as e:
                if time.monotonic() + delay > deadline:
                    raise ModelLoadError(f"SD WebUI not ready after {self.ready_timeout_s:g}s: {e}") from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._current = options.get("sd_model_checkpoint")
        if self.default_model is not None:
            async with self._lock:
                await self._switch(self.default_model)

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        """Run one job; see ``Runtime.run``."""
        endpoint = ENDPOINTS.get(job.type)
        if endpoint is None:
            raise Reject(f"the a1111 runtime cannot run {job.type.value!r} tasks", code="unsupported_task")
        body = await self._body(job)
        async with self._lock:
            self._interrupted = False
            self._running = job.task_id
            try:
                t0 = time.perf_counter()
                switched = job.model is not None and await self._switch(job.model)
                switch_s = time.perf_counter() - t0 if switched else 0.0
                data = await self._call_with_progress(f"/sdapi/v1/{endpoint}", body, progress)
            finally:
                self._running = None
        if self._interrupted:
            raise Interrupted(f"task {job.task_id} interrupted")
        result = self._result(job, data)
        result.switch_s = switch_s
        await progress(1.0)
        return result

    async def interrupt(self, task_id: str | None = None) -> None:
        """Ask the WebUI to stop the job of ``task_id`` (None: ours, whichever it is); its ``run``
        raises ``Interrupted``. Nothing is sent unless one of our jobs is running."""
        if self._running is None or task_id not in (None, self._running):
            return
        self._interrupted = True
        with contextlib.suppress(RuntimeFailure, Reject):
            await self._call("POST", "/sdapi/v1/interrupt")

    async def aclose(self) -> None:
        await self.client.aclose()
        if self.fetcher is not None:
            await self.fetcher.aclose()

    async def _body(self, job: Job) -> dict[str, Any]:
        body = build_body(job)
        try:
            return {k: v if k in _TEXT_KEYS else await inline_urls(v, self._fetch) for k, v in body.items()}
        except InputFetchError as e:
            raise Reject(e.message or str(e), code=e.code) from e

    async def _fetch(self, url: str) -> bytes:
        if self.fetcher is None:
            raise InputFetchError(f"no input fetcher: cannot fetch {url}", code="url_refused")
        return await self.fetcher.fetch(url)

    async def _switch(self, model: str) -> bool:
        """True when SD WebUI loaded another checkpoint (the lookup alone is no switch)."""
        title = await self._title(model)
        if title == self._current:
            return False
        log.info("switching SD WebUI checkpoint %s -> %s", self._current, title)
        await self._call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": title})
        self._current = title
        self.switches += 1
        return True

    async def _title(self, model: str) -> str:
        for refresh in (False, True):
            if refresh or not self._models:
                self._models = await self._call("GET", "/sdapi/v1/sd-models")
            found = next((m for m in self._models if _matches(model, m)), None)
            if found is not None:
                return str(found["title"])
        raise Reject(f"SD WebUI has no checkpoint {model!r}", code="unknown_model")

    async def _call_with_progress(self, path: str, body: dict[str, Any], progress: ProgressFn) -> Any:
        poller = asyncio.create_task(self._poll(progress))
        try:
            return await self._call("POST", path, body)
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

    async def _poll(self, progress: ProgressFn) -> None:
        last = 0.0
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                state = await self._call("GET", "/sdapi/v1/progress", params={"skip_current_image": "true"})
                value = float(state.get("progress") or 0.0)
            except (RuntimeFailure, Reject, ValueError, AttributeError) as e:
                log.debug("progress poll failed: %s", e)
                continue
            if value > last:
                last = value
                await progress(min(value, 0.99))

    async def _call(
        self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None
    ) -> Any:
        try:
            resp = await self.client.request(method, path, json=body, params=params)
        except httpx.TransportError as e:
            raise RuntimeFailure(f"SD WebUI unreachable at {self.client.base_url}: {e!r}") from e
        if resp.status_code >= 500:
            raise RuntimeFailure(f"SD WebUI {path} failed ({resp.status_code}): {_message(resp)}")
        if resp.status_code >= 400:
            raise Reject(f"SD WebUI refused {path} ({resp.status_code}): {_message(resp)}", code="rejected")
        try:
            return resp.json()
        except ValueError as e:
            raise RuntimeFailure(f"SD WebUI {path} answered non-JSON: {resp.text[:200]}") from e

    def _result(self, job: Job, data: Any) -> RuntimeResult:
        if not isinstance(data, dict):
            raise RuntimeFailure(f"unexpected SD WebUI answer: {str(data)[:200]}")
        encoded = data.get("images") or ([data["image"]] if data.get("image") else [])
        if not encoded:
            raise RuntimeFailure("SD WebUI returned no images (interrupted from elsewhere?)")
        images = [base64.b64decode(i.split(",", 1)[-1]) for i in encoded]
        info: dict[str, Any] = {"html_info": data["html_info"]} if "html_info" in data else {}
        if isinstance(data.get("info"), str):
            with contextlib.suppress(ValueError):
                info = json.loads(data["info"])
        info["runtime"] = self.name
        seed = info.get("seed") if job.type in (TaskType.TEXT_TO_IMAGE, TaskType.IMAGE_TO_IMAGE) else None
        return RuntimeResult(images=images, info=info, seed=seed, model=self._current)
