"""One ComfyUI websocket per runtime, its messages handed to the run that owns each prompt id.

ComfyUI sends a prompt's messages to the socket of the ``client_id`` it was queued with; every
message about a prompt carries its ``prompt_id``. A runtime keeps one socket (its own client id)
for all its prompts, and each ``run`` registers a ``PromptWatch`` under the prompt id it chose
before queueing, so no message is missed, and progress and ends go to the run they belong to.
Messages about other prompts (another client's ``execution_interrupted`` is sent to everyone) are
dropped.

When the socket closes while prompts are watched, the reader reconnects with the same client id
and tells every watch ``RECONCILE``: its run then asks ``/history`` and ``/queue`` what it missed.
When it cannot reconnect, watches get ``LOST``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from sdfleet.errors import RuntimeFailure

log = logging.getLogger(__name__)

RECONCILE = "sdfleet.reconcile"
"""Messages may have been missed (socket reconnected, prompt re-keyed): ask the server."""
LOST = "sdfleet.lost"
"""The socket is gone and could not be reopened."""
GONE = "sdfleet.gone"
"""``interrupt`` removed the prompt before it ran: no message will ever come."""
# The messages a run acts on; ComfyUI's others (status, progress_state, executed …) are dropped here.
KINDS = {"progress", "execution_success", "execution_error", "execution_interrupted", "executing"}

Event = tuple[str, dict[str, Any]]


@dataclass(eq=False)
class PromptWatch:
    """One run's prompt: its id (chosen before queueing), task, messages and interrupt state."""

    task_id: str
    prompt_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    sent: bool = False
    """``POST /prompt`` went out: ComfyUI may hold the prompt even if no answer came back."""
    queued: bool = False
    """``POST /prompt`` accepted it: from now on stopping it means telling ComfyUI."""
    interrupted: bool = False


def ws_url(base: httpx.URL, client_id: str) -> str:
    scheme = "wss" if base.scheme == "https" else "ws"
    return str(base.copy_with(scheme=scheme, path="/ws", query=f"clientId={client_id}".encode()))


class EventStream:
    """The runtime's socket: opened on first use, read by one task, reopened when it drops."""

    def __init__(self, base_url: httpx.URL, *, reconnect_s: float = 10.0) -> None:
        self.base_url = base_url
        self.reconnect_s = reconnect_s
        self.client_id = uuid.uuid4().hex
        self.watches: dict[str, PromptWatch] = {}
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def watch(self, task_id: str) -> PromptWatch:
        w = PromptWatch(task_id)
        self.watches[w.prompt_id] = w
        return w

    def rekey(self, w: PromptWatch, prompt_id: str) -> None:
        self.watches.pop(w.prompt_id, None)
        w.prompt_id = prompt_id
        self.watches[prompt_id] = w

    def unwatch(self, w: PromptWatch) -> None:
        if self.watches.get(w.prompt_id) is w:
            del self.watches[w.prompt_id]

    async def ensure_open(self) -> None:
        """Connect (if not connected) before a prompt is queued: ComfyUI drops messages for a
        client id without a socket. Raises ``RuntimeFailure``."""
        async with self._lock:
            if self._reader is not None and not self._reader.done():
                return
            ws = await self._connect()
            self._reader = asyncio.create_task(self._read(ws), name=f"comfyui-ws-{self.client_id[:8]}")

    async def _connect(self) -> ClientConnection:
        try:
            return await connect(ws_url(self.base_url, self.client_id), max_size=None, open_timeout=10)
        except (TimeoutError, OSError, WebSocketException) as e:
            raise RuntimeFailure(f"ComfyUI websocket at {self.base_url} failed: {e!r}") from e

    async def _read(self, ws: ClientConnection) -> None:
        try:
            while True:
                try:
                    async for raw in ws:
                        self._dispatch(raw)
                except (OSError, WebSocketException) as e:
                    log.warning("ComfyUI websocket dropped: %r", e)
                if not self.watches:
                    return  # nothing to miss; the next run reconnects
                try:
                    ws = await self._reconnect()
                except RuntimeFailure as e:
                    self._broadcast(LOST, {"error": str(e)})
                    return
                self._broadcast(RECONCILE, {})
        except Exception as e:  # a bug here must not leave runs waiting for messages forever
            log.exception("ComfyUI websocket reader failed")
            self._broadcast(LOST, {"error": repr(e)})
        finally:
            await ws.close()

    async def _reconnect(self) -> ClientConnection:
        deadline = time.monotonic() + self.reconnect_s
        delay = 0.1
        while True:
            try:
                return await self._connect()
            except RuntimeFailure:
                if time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _dispatch(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            return  # preview frames
        try:
            msg = json.loads(raw)
        except ValueError:
            return
        data = msg.get("data") if isinstance(msg, dict) else None
        if not isinstance(data, dict) or msg.get("type") not in KINDS:
            return
        w = self.watches.get(str(data.get("prompt_id")))
        if w is not None:
            w.events.put_nowait((str(msg["type"]), data))

    def _broadcast(self, kind: str, data: dict[str, Any]) -> None:
        for w in self.watches.values():
            w.events.put_nowait((kind, data))

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
