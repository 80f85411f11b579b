"""A ComfyUI test server: its HTTP API, websocket, prompt queue and message order, with a fake executor.

Follows ComfyUI 0.3.64 (``server.py``, ``execution.py``, ``main.py``) where sdfleet depends on it:

- ``POST /prompt`` validates like ComfyUI (``comfyui_graph``): 400 ``{"error", "node_errors"}`` when no
  output node is valid, else 200 ``{"prompt_id", "number", "node_errors"}`` with the invalid outputs
  left out of the run. A ``prompt_id`` in the body is used as the id.
- One worker runs the queue in ``number`` order (FIFO), one prompt at a time; ``GET /queue`` lists
  ``queue_running`` / ``queue_pending``; ``POST /queue {"delete": [...], "clear"}`` drops queued ones.
- ``POST /interrupt``: with ``prompt_id``, only when that prompt runs; without (or an unreadable
  body), whatever runs. Like ComfyUI's global flag, it is cleared when the next prompt starts.
- Messages of a run go to the prompt's ``client_id`` socket (to every socket when it has none):
  ``execution_start``, ``execution_cached``, ``executing`` {node}, ``progress``, ``executed``, then
  ``execution_success`` / ``execution_error`` / ``execution_interrupted`` (the last one to every
  socket when the prompt has no client). The ``/history`` entry is written ``history_delay_s``
  after that (ComfyUI's ``task_done`` runs after the executor returns), then ``executing
  {node: null}``.
- ``POST /upload/image`` as ComfyUI: ``subfolder``, ``type``, ``overwrite``; a same-named file with
  the same bytes is reused, different bytes get ``name (1).ext``; paths outside the folder → 400.
- ``SaveImage`` writes ``type: output`` images, ``PreviewImage`` ``type: temp`` ones.

"Executing": each KSampler steps through ``inputs.steps`` (``step_s`` apart, waiting while
``paused``); images take the size of the nearest EmptyLatentImage (batch_size too) and a colour
drawn from the KSampler seed; a ``RaiseError`` node fails with its ``message`` and ``type``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import posixpath
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from fakes.comfyui_executor import FakeExecutor, Item
from fakes.comfyui_graph import validate_prompt


class FakeComfyUI(FakeExecutor):
    def __init__(
        self, step_s: float = 0.005, history_delay_s: float = 0.05, checkpoints: set[str] | None = None
    ) -> None:
        self.step_s = step_s
        self.history_delay_s = history_delay_s
        self.checkpoints = checkpoints
        self.files: dict[str, dict[str, bytes]] = {"input": {}, "output": {}, "temp": {}}
        self.history: dict[str, Any] = {}
        self.prompts: list[dict[str, Any]] = []
        self.accepted: list[str] = []
        self.pending: list[Item] = []
        self.running: Item | None = None
        self.sockets: dict[str, WebSocket] = {}
        self.client_id: str | None = None
        self.interrupt_flag = False
        self.interrupt_calls: list[str | None] = []
        self.deleted: list[str] = []
        self.paused = False
        self.number = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        routes = [
            Route("/prompt", self.post_prompt, methods=["POST"]),
            Route("/queue", self.get_queue, methods=["GET"]),
            Route("/queue", self.post_queue, methods=["POST"]),
            Route("/interrupt", self.post_interrupt, methods=["POST"]),
            Route("/upload/image", self.upload_image, methods=["POST"]),
            Route("/history/{prompt_id}", self.get_history),
            Route("/view", self.view),
            Route("/system_stats", self.system_stats),
            WebSocketRoute("/ws", self.ws),
        ]
        self.app = Starlette(routes=routes, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        worker = asyncio.create_task(self._worker())
        yield
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10) -> Any:
        """Run ``coro`` on the server's event loop (from a test's thread) and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def drop_sockets(self) -> None:
        """Close every websocket, as a restarting proxy or a network blip would."""
        for sid, socket in list(self.sockets.items()):
            self.sockets.pop(sid, None)
            with contextlib.suppress(Exception):
                await socket.close(code=1011)

    # websocket -------------------------------------------------------------------------------
    async def ws(self, websocket: WebSocket) -> None:
        sid = websocket.query_params.get("clientId") or uuid.uuid4().hex
        await websocket.accept()
        self.sockets[sid] = websocket  # a reused clientId replaces the old socket, as in ComfyUI
        remaining = len(self.pending) + (self.running is not None)
        status = {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": sid}
        await websocket.send_json({"type": "status", "data": status})
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            if self.sockets.get(sid) is websocket:
                self.sockets.pop(sid, None)

    async def send(self, sid: str | None, kind: str, data: dict[str, Any]) -> None:
        """To ``sid``'s socket; to every socket when ``sid`` is None (ComfyUI's ``send_sync``)."""
        targets = list(self.sockets.items()) if sid is None else [(sid, self.sockets.get(sid))]
        for name, socket in targets:
            if socket is None:
                continue
            try:
                await socket.send_json({"type": kind, "data": data})
            except Exception:
                self.sockets.pop(name, None)

    # queue -----------------------------------------------------------------------------------
    async def post_prompt(self, request: Request) -> JSONResponse:
        body = await request.json()
        if "number" in body:
            number = float(body["number"])
        else:
            number = float(-self.number if body.get("front") else self.number)
            self.number += 1
        prompt = body.get("prompt")
        if not isinstance(prompt, dict):
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided"}
            return JSONResponse({"error": {**error, "extra_info": {}}, "node_errors": {}}, status_code=400)
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        ok, error, outputs, node_errors = validate_prompt(prompt, self._has_input, self.checkpoints)
        if not ok:
            return JSONResponse({"error": error, "node_errors": node_errors}, status_code=400)
        extra = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        self.prompts.append(body)
        self.accepted.append(prompt_id)
        heapq.heappush(self.pending, (number, prompt_id, prompt, extra, outputs))
        assert self._wake is not None
        self._wake.set()
        return JSONResponse({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def get_queue(self, request: Request) -> JSONResponse:
        running = [list(self.running)] if self.running else []
        return JSONResponse({"queue_running": running, "queue_pending": [list(i) for i in self.pending]})

    async def post_queue(self, request: Request) -> Response:
        body = await request.json()
        if body.get("clear"):
            self.pending = []
        for prompt_id in body.get("delete") or []:
            kept = [item for item in self.pending if item[1] != prompt_id]
            if len(kept) < len(self.pending):
                self.deleted.append(prompt_id)
            self.pending = kept
            heapq.heapify(self.pending)
        return Response(status_code=200)

    async def post_interrupt(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        self.interrupt_calls.append(prompt_id)
        if not prompt_id or (self.running is not None and self.running[1] == prompt_id):
            self.interrupt_flag = True
        return Response(status_code=200)

    async def _worker(self) -> None:
        assert self._wake is not None
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            self.running = heapq.heappop(self.pending)
            await self._execute(self.running)

    # files -------------------------------------------------------------------------------------
    def _has_input(self, name: str) -> bool:
        return posixpath.normpath(name) in self.files["input"]

    async def upload_image(self, request: Request) -> Response:
        async with request.form() as form:  # closes the uploaded file's spool
            return self._upload(form)

    def _upload(self, form: Any) -> Response:
        upload = form.get("image")
        kind = str(form.get("type") or "input")
        if not isinstance(upload, UploadFile) or not upload.filename or kind not in self.files:
            return Response(status_code=400)
        subfolder = str(form.get("subfolder") or "")
        folder = posixpath.normpath(subfolder) if subfolder else ""
        if folder.startswith(("/", "..")) or "/" in upload.filename:
            return Response(status_code=400)
        upload.file.seek(0)
        data = upload.file.read()
        name, store = upload.filename, self.files[kind]
        stem, ext = posixpath.splitext(name)
        n = 1
        while str(form.get("overwrite")) not in ("true", "1") and posixpath.join(folder, name) in store:
            if hashlib.sha256(store[posixpath.join(folder, name)]).digest() == hashlib.sha256(data).digest():
                return JSONResponse({"name": name, "subfolder": subfolder, "type": kind})
            name, n = f"{stem} ({n}){ext}", n + 1
        store[posixpath.join(folder, name)] = data
        return JSONResponse({"name": name, "subfolder": subfolder, "type": kind})

    async def get_history(self, request: Request) -> JSONResponse:
        prompt_id = request.path_params["prompt_id"]
        return JSONResponse({prompt_id: self.history[prompt_id]} if prompt_id in self.history else {})

    async def view(self, request: Request) -> Response:
        q = request.query_params
        store = self.files.get(q.get("type") or "output", {})
        name = posixpath.join(q.get("subfolder", ""), q.get("filename", ""))
        if name not in store:
            return Response(status_code=404)
        return Response(store[name], media_type="image/png")

    async def system_stats(self, request: Request) -> JSONResponse:
        system = {"os": "posix", "comfyui_version": "fake", "python_version": "3"}
        return JSONResponse({"system": system, "devices": []})
