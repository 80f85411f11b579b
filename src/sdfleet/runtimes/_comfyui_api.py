"""ComfyUI's HTTP API as the ``comfyui`` runtime uses it, with ComfyUI's errors made readable.

Every call maps failures at this boundary: unreachable or 5xx → ``RuntimeFailure`` (the task
retries), 4xx → ``Reject``. ``POST /prompt`` refusals and ``node_errors`` become one line per
error: node id, class and ComfyUI's message with its details.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from sdfleet.errors import Reject, RuntimeFailure

UPLOAD_FOLDER = "sdfleet"
"""Inputs are uploaded to ``input/sdfleet/<UTC date>/<sha256>.<ext>``: the same bytes get the same
name all day, which ComfyUI recognises (same name, same hash) and does not write again; a folder
per day lets an operator delete past days' folders without pulling a file from under a queued
prompt (a reused file keeps its first upload's time, so pruning single files by age would)."""
MAX_REPORTED_ERRORS = 20


def describe_node_errors(node_errors: Mapping[str, Any]) -> list[str]:
    """One line per error: ``node 10 (LoadImage): Custom validation failed for node: image - …``."""
    lines = []
    for node_id, entry in node_errors.items():
        entry = entry if isinstance(entry, Mapping) else {}
        errors = entry.get("errors") or [{}]
        for error in errors:
            error = error if isinstance(error, Mapping) else {"message": str(error)}
            message = str(error.get("message") or "invalid")
            details = str(error.get("details") or "")
            text = f"{message}: {details}" if details else message
            lines.append(f"node {node_id} ({entry.get('class_type', '?')}): {text}")
    return lines


def describe_refusal(body: Any) -> str:
    """The reason of a ``POST /prompt`` 400: ComfyUI's ``error`` message, then each node error."""
    body = body if isinstance(body, Mapping) else {}
    error = body.get("error")
    node_lines = describe_node_errors(body.get("node_errors") or {})
    if isinstance(error, Mapping):
        head = str(error.get("message") or error.get("type") or "invalid prompt")
        if error.get("details") and not node_lines:
            head += f": {error['details']}"
    else:
        head = str(error or "invalid prompt")
    return join_lines(head, node_lines)


def join_lines(head: str, lines: list[str]) -> str:
    shown = lines[:MAX_REPORTED_ERRORS]
    more = len(lines) - len(shown)
    tail = f"; and {more} more" if more > 0 else ""
    return f"{head}; " + "; ".join(shown) + tail if shown else head


def input_name(data: bytes) -> str:
    """``<sha256>.<ext>``: the content-addressed file name of an input image."""
    ext = "png"
    if data[:3] == b"\xff\xd8\xff":
        ext = "jpg"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        ext = "webp"
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        ext = "gif"
    return f"{hashlib.sha256(data).hexdigest()}.{ext}"


class ComfyAPI:
    """The calls of one runtime on the ComfyUI at ``client.base_url``."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.today: Callable[[], str] = lambda: datetime.now(UTC).date().isoformat()
        """The upload folder's day (tests pin it)."""

    async def call(self, method: str, path: str, *, raw: bool = False, **kwargs: Any) -> Any:
        resp = await self._request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise Reject(f"ComfyUI refused {path} ({resp.status_code}): {resp.text[:500]}", code="rejected")
        if raw:
            return resp.content
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as e:
            raise RuntimeFailure(f"ComfyUI {path} answered non-JSON: {resp.text[:200]}") from e

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = await self.client.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise RuntimeFailure(f"ComfyUI unreachable at {self.client.base_url}: {e!r}") from e
        if resp.status_code >= 500:
            raise RuntimeFailure(f"ComfyUI {path} failed ({resp.status_code}): {resp.text[:500]}")
        return resp

    async def queue(self, workflow: dict[str, Any], prompt_id: str, client_id: str) -> tuple[str, list[str]]:
        """Queue the workflow, asking for ``prompt_id`` as its id; returns the id ComfyUI gave it
        (before 0.3.45 ComfyUI picks its own) and its ``node_errors`` as lines (the outputs it
        left out). Raises ``Reject`` with every node error when ComfyUI refuses the workflow."""
        body = {"prompt": workflow, "client_id": client_id, "prompt_id": prompt_id}
        resp = await self._request("POST", "/prompt", json=body)
        try:
            answer = resp.json()
        except ValueError:
            answer = {"error": resp.text[:500]}
        if resp.status_code >= 400:
            raise Reject(f"ComfyUI refused the workflow: {describe_refusal(answer)}", code="invalid_workflow")
        if not isinstance(answer, Mapping) or not answer.get("prompt_id"):
            raise RuntimeFailure(f"ComfyUI /prompt answered without a prompt_id: {resp.text[:200]}")
        return str(answer["prompt_id"]), describe_node_errors(answer.get("node_errors") or {})

    async def cancel(self, prompt_ids: list[str]) -> set[str]:
        """Stop these prompts and no other: delete them from the queue, then interrupt each in case
        it runs (ComfyUI skips an interrupt naming a prompt that does not run, and an interrupt
        without a prompt id would stop whatever runs). Deleting first leaves no gap in which one
        could start unseen. Returns the ids that are neither queued nor running any more."""
        await self.call("POST", "/queue", json={"delete": prompt_ids})
        for prompt_id in prompt_ids:
            await self.call("POST", "/interrupt", json={"prompt_id": prompt_id})
        queue = await self.call("GET", "/queue")
        return set(prompt_ids) - _ids(queue)

    async def is_queued(self, prompt_id: str) -> bool:
        """Whether ``prompt_id`` is running or waiting in ComfyUI's queue."""
        return prompt_id in _ids(await self.call("GET", "/queue"))

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        answer = await self.call("GET", f"/history/{prompt_id}")
        entry = (answer or {}).get(prompt_id)
        return entry if isinstance(entry, dict) else None

    async def wait_history(self, prompt_id: str, wait_s: float) -> dict[str, Any]:
        """The ``/history`` entry of a finished prompt. ComfyUI writes it after it has announced the
        end (``execution_success`` comes first), so poll for it, at most ``wait_s`` seconds."""
        deadline = time.monotonic() + wait_s
        delay = 0.02
        while (entry := await self.history(prompt_id)) is None:
            if time.monotonic() + delay > deadline:
                raise RuntimeFailure(f"ComfyUI wrote no /history entry for {prompt_id} in {wait_s:g}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        return entry

    async def upload(self, data: bytes) -> str:
        """Upload an input image; returns the name a ``LoadImage`` node takes
        (``sdfleet/2026-12-01/<sha256>.png``)."""
        files = {"image": (input_name(data), data, "application/octet-stream")}
        form = {"type": "input", "subfolder": f"{UPLOAD_FOLDER}/{self.today()}"}
        saved = await self.call("POST", "/upload/image", files=files, data=form)
        name, sub = str(saved["name"]), str(saved.get("subfolder") or "")
        return f"{sub}/{name}" if sub else name

    async def view(self, ref: Mapping[str, Any]) -> bytes:
        params = {"filename": ref["filename"], "subfolder": ref.get("subfolder", ""), "type": ref["type"]}
        data: bytes = await self.call("GET", "/view", params=params, raw=True)
        return data

    async def cancel_quietly(self, prompt_id: str) -> None:
        """``cancel`` for clean-up paths, where ComfyUI being down changes nothing."""
        with contextlib.suppress(RuntimeFailure, Reject):
            await self.cancel([prompt_id])


def _ids(queue: Any) -> set[str]:
    """The prompt ids in a ``GET /queue`` answer (items are ``[number, prompt_id, …]``)."""
    queue = queue if isinstance(queue, Mapping) else {}
    items = [*(queue.get("queue_running") or []), *(queue.get("queue_pending") or [])]
    return {str(item[1]) for item in items if isinstance(item, list) and len(item) > 1}
