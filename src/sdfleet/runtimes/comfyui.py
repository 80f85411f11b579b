"""The ``comfyui`` runtime: ``pipeline`` tasks (a ComfyUI workflow in API format) on a ComfyUI server.

Input images named by URL in ``LoadImage`` nodes are fetched through the agent's guarded fetcher and
uploaded with ``POST /upload/image``; the workflow is queued with ``POST /prompt`` under this run's
``client_id``; progress and the end of the run come over the ``/ws?clientId=`` websocket (package
``websockets``); results are read from ``/history/{prompt_id}`` and ``/view``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from sdfleet.errors import InputFetchError, Interrupted, ModelLoadError, Reject, RuntimeFailure
from sdfleet.guarded_http import InputFetcher, fetcher_from_options
from sdfleet.models.catalog import ModelCatalog
from sdfleet.runtimes.base import Job, ProgressFn, RuntimeResult
from sdfleet.tasks import TaskType

log = logging.getLogger(__name__)


def _ws_url(base: httpx.URL, client_id: str) -> str:
    scheme = "wss" if base.scheme == "https" else "ws"
    return str(base.copy_with(scheme=scheme, path="/ws", query=f"clientId={client_id}".encode()))


class ComfyUIRuntime:
    """Runs workflow jobs on the ComfyUI at ``client.base_url``."""

    name = "comfyui"
    max_in_flight = 1

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        fetcher: InputFetcher | None = None,
        ready_timeout_s: float = 300.0,
    ) -> None:
        self.client = client
        self.fetcher = fetcher
        self.ready_timeout_s = ready_timeout_s
        self._prompt_id: str | None = None
        self._task_id: str | None = None
        self._interrupted = False
        self._lock = asyncio.Lock()

    @classmethod
    def from_options(
        cls,
        *,
        catalog: ModelCatalog,
        options: Mapping[str, Any],
        default_model: str | None = None,
        cache_size: int = 2,
    ) -> ComfyUIRuntime:
        """Options: ``url`` (default http://127.0.0.1:8188), ``timeout_s``, ``ready_timeout_s`` and the
        guarded fetcher's ``input_max_bytes``, ``input_timeout_s``, ``allow_private_inputs``."""
        url = str(options.get("url", "http://127.0.0.1:8188")).rstrip("/")
        fetcher = fetcher_from_options(options)
        timeout = httpx.Timeout(float(options.get("timeout_s", 60)), connect=10.0)
        client = httpx.AsyncClient(base_url=url, timeout=timeout, trust_env=False)
        return cls(client, fetcher=fetcher, ready_timeout_s=float(options.get("ready_timeout_s", 300)))

    @property
    def loaded_model(self) -> str | None:
        return None  # the workflow's own loader nodes choose the checkpoint

    async def start(self) -> None:
        """Wait until ComfyUI answers ``/system_stats`` (backoff up to ``ready_timeout_s``)."""
        deadline = time.monotonic() + self.ready_timeout_s
        delay = 0.1
        while True:
            try:
                await self._call("GET", "/system_stats")
                return
            except RuntimeFailure as e:
                if time.monotonic() + delay > deadline:
                    raise ModelLoadError(f"ComfyUI not ready after {self.ready_timeout_s:g}s: {e}") from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        """Queue the workflow, follow it over the websocket, return its output images."""
        if job.type is not TaskType.PIPELINE or not job.params.workflow:
            raise Reject("the comfyui runtime runs 'pipeline' tasks with a workflow", code="unsupported_task")
        async with self._lock:
            self._interrupted = False
            workflow = await self._upload_inputs(copy.deepcopy(job.params.workflow))
            client_id = uuid.uuid4().hex
            try:
                async with connect(_ws_url(self.client.base_url, client_id), max_size=None) as ws:
                    prompt_id = await self._queue(workflow, client_id)
                    self._prompt_id, self._task_id = prompt_id, job.task_id
                    await self._follow(ws, prompt_id, progress)
            except (OSError, WebSocketException) as e:
                raise RuntimeFailure(f"ComfyUI websocket failed: {e!r}") from e
            finally:
                self._prompt_id = self._task_id = None
            images = await self._outputs(prompt_id)
        await progress(1.0)
        return RuntimeResult(images=images, info={"runtime": self.name, "prompt_id": prompt_id})

    async def interrupt(self, task_id: str | None = None) -> None:
        """Ask ComfyUI to stop the prompt of ``task_id`` (None: ours, whichever it is); ``run`` raises
        ``Interrupted``. Never an empty ``/interrupt``: ComfyUI reads it as "stop whatever runs",
        another client's prompt included."""
        if self._prompt_id is None or task_id not in (None, self._task_id):
            return
        self._interrupted = True
        with contextlib.suppress(RuntimeFailure, Reject):
            await self._call("POST", "/interrupt", json={"prompt_id": self._prompt_id})

    async def aclose(self) -> None:
        await self.client.aclose()
        if self.fetcher is not None:
            await self.fetcher.aclose()

    async def _upload_inputs(self, workflow: dict[str, Any]) -> dict[str, Any]:
        for node in workflow.values():
            if not isinstance(node, dict) or node.get("class_type") != "LoadImage":
                continue
            inputs = node.get("inputs") or {}
            image = inputs.get("image")
            if isinstance(image, str) and image[:8].lower().startswith(("http://", "https://", "data:")):
                inputs["image"] = await self._upload(image)
        return workflow

    async def _upload(self, url: str) -> str:
        if self.fetcher is None:
            raise Reject(f"no input fetcher: cannot fetch {url}", code="url_refused")
        try:
            data = await self.fetcher.fetch(url)
        except InputFetchError as e:
            raise Reject(e.message or str(e), code=e.code) from e
        files = {"image": (f"sdfleet-{uuid.uuid4().hex}.png", data, "image/png")}
        saved = await self._call("POST", "/upload/image", files=files, data={"type": "input"})
        name, sub = str(saved["name"]), str(saved.get("subfolder") or "")
        return f"{sub}/{name}" if sub else name

    async def _queue(self, workflow: dict[str, Any], client_id: str) -> str:
        answer = await self._call("POST", "/prompt", json={"prompt": workflow, "client_id": client_id})
        return str(answer["prompt_id"])

    async def _follow(self, ws: ClientConnection, prompt_id: str, progress: ProgressFn) -> None:
        async for raw in ws:
            if isinstance(raw, bytes):
                continue  # preview images
            msg = json.loads(raw)
            data = msg.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if await self._handle(msg.get("type"), data, prompt_id, progress):
                return
        raise RuntimeFailure("ComfyUI closed the websocket before the prompt finished")

    async def _handle(self, kind: Any, data: dict[str, Any], prompt_id: str, progress: ProgressFn) -> bool:
        """True when the prompt is done."""
        if kind == "progress" and data.get("max"):
            await progress(min(0.99, float(data["value"]) / float(data["max"])))
        elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            return True
        elif kind == "execution_success":
            return True
        elif kind == "execution_interrupted":
            raise Interrupted(f"ComfyUI prompt {prompt_id} interrupted")
        elif kind == "execution_error":
            text = f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message')}"
            if "OutOfMemory" in str(data.get("exception_type")):
                raise RuntimeFailure(f"ComfyUI ran out of memory in {text}")
            raise Reject(f"ComfyUI workflow failed in {text}", code="workflow_error")
        return False

    async def _outputs(self, prompt_id: str) -> list[bytes]:
        if self._interrupted:
            raise Interrupted(f"ComfyUI prompt {prompt_id} interrupted")
        history = await self._call("GET", f"/history/{prompt_id}")
        outputs = (history.get(prompt_id) or {}).get("outputs") or {}
        refs = [i for out in outputs.values() for i in out.get("images", []) if i.get("type") == "output"]
        if not refs:
            raise RuntimeFailure(f"ComfyUI prompt {prompt_id} produced no output images (no SaveImage?)")
        images = []
        for ref in refs:
            params = {"filename": ref["filename"], "subfolder": ref.get("subfolder", ""), "type": "output"}
            images.append(await self._call("GET", "/view", params=params, raw=True))
        return images

    async def _call(self, method: str, path: str, *, raw: bool = False, **kwargs: Any) -> Any:
        try:
            resp = await self.client.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise RuntimeFailure(f"ComfyUI unreachable at {self.client.base_url}: {e!r}") from e
        if resp.status_code >= 500:
            raise RuntimeFailure(f"ComfyUI {path} failed ({resp.status_code}): {resp.text[:500]}")
        if resp.status_code >= 400:
            raise Reject(f"ComfyUI refused {path} ({resp.status_code}): {resp.text[:500]}", code="rejected")
        if raw:
            return resp.content
        try:
            return resp.json()
        except ValueError as e:
            raise RuntimeFailure(f"ComfyUI {path} answered non-JSON: {resp.text[:200]}") from e
