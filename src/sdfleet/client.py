"""Python SDK over the HTTP API (async; ``asyncio.run`` it from sync code)."""

from __future__ import annotations

import asyncio
import re
import time
from types import TracebackType
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sdfleet.errors import Conflict, NotFound, SdfleetError, Unauthorized, ValidationFailed
from sdfleet.tasks import TASK_ID_PATTERN
from sdfleet.urls import http_base

TERMINAL = ("succeeded", "failed", "cancelled")
UNREACHABLE = "api_unreachable"
POLL_TRIES = 10
"""Polls in a row that may fail to reach the API (a busy or restarting API) before a wait gives up."""
PAGE = 500
"""Tasks per ``GET /v1/tasks`` call of ``list`` (the API's most)."""
_PATHS = {"v1": "/v1/tasks", "v1alpha1": "/v1alpha1/", "v1alpha2": "/v1alpha2/"}


class AsyncClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        base = http_base(base_url, "API URL")  # ConfigError: not an http(s) URL with a host
        self._http = httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout_s)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            reason = str(e) or type(e).__name__  # a read timeout says nothing by itself
            message = f"cannot reach the API at {self._http.base_url}: {reason}"
            raise SdfleetError(message, code=UNREACHABLE) from e
        data = _answer(response)
        if response.status_code >= 400:
            raise _error(response.status_code, data)
        if not isinstance(data, dict):
            raise SdfleetError(f"unexpected answer from {path}: {data!r}")
        return data

    async def submit(self, **task: Any) -> dict[str, Any]:
        """``POST /v1/tasks`` with the fields of a task request; returns the task view."""
        return await self._call("POST", "/v1/tasks", json=task)

    async def submit_raw(self, body: dict[str, Any], *, fmt: str = "v1") -> str:
        """Send a body in one of the wire formats; returns the task id."""
        if fmt not in _PATHS:
            raise ValidationFailed(f"unknown format {fmt!r}; use one of {', '.join(_PATHS)}")
        data = await self._call("POST", _PATHS[fmt], json=body)
        return str(data.get("id") or data.get("id_task"))

    async def get(self, task_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/v1/tasks/{_task_path(task_id)}")

    async def poll(self, task_id: str) -> dict[str, Any]:
        """``get``, tried again (a second apart, ``POLL_TRIES`` in all) while the API cannot be reached."""
        failed = 0
        while True:
            try:
                return await self.get(task_id)
            except SdfleetError as e:
                failed += 1
                if e.code != UNREACHABLE or failed >= POLL_TRIES:
                    raise
            await asyncio.sleep(1.0)

    async def cancel(self, task_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/tasks/{_task_path(task_id)}/cancel")

    async def list(self, *, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """``GET /v1/tasks``, newest first, following its cursor for up to ``limit`` tasks."""
        tasks: list[dict[str, Any]] = []
        cursor: str | None = None
        while len(tasks) < limit:
            query = {"limit": min(PAGE, limit - len(tasks)), "state": state, "cursor": cursor}
            page = await self._call(
                "GET", "/v1/tasks", params={k: v for k, v in query.items() if v is not None}
            )
            tasks.extend(page["tasks"])
            cursor = page.get("cursor")
            if not cursor:
                break
        return tasks

    async def delete(self, task_id: str) -> None:
        """``DELETE /v1/tasks/{id}``: a finished task's files and record, now."""
        await self._call("DELETE", f"/v1/tasks/{_task_path(task_id)}")

    async def wait(self, task_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.25) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            view = await self.poll(task_id)
            if view["state"] in TERMINAL:
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} still {view['state']} after {timeout_s} s")
            await asyncio.sleep(poll_s)


def _task_path(task_id: str) -> str:
    """A task id as one path segment: refused here unless it is one (``?``, ``/`` or an empty id
    would name another resource), so the API's 422 for a bad id is ours to give, not a wrong 404."""
    if not re.match(TASK_ID_PATTERN, task_id):
        raise ValidationFailed(
            f"{task_id!r} is not a task id (1-128 of A-Z a-z 0-9 . _ : -, not starting with . : or -)"
        )
    return task_id


def _answer(response: httpx.Response) -> Any:
    """The API's JSON answer. Anything else (another server on that address, a proxy's error page
    while the API restarts) is said as what it is; a gateway's 502/503/504 counts as the API not
    reached, so ``poll`` tries again."""
    if not response.content:
        return {}
    try:
        return response.json()
    except ValueError:  # JSONDecodeError, or bytes that are not text
        kind = response.headers.get("content-type") or "no content type"
        request = response.request
        raise SdfleetError(
            f"{request.method} {request.url} answered HTTP {response.status_code} ({kind}), not the "
            "API's JSON: another server on that address, or a proxy's error page",
            code=UNREACHABLE if response.status_code in (502, 503, 504) else "not_json",
        ) from None


def _error(status: int, data: Any) -> SdfleetError:
    err = data.get("error", {}) if isinstance(data, dict) else {}
    message = f"HTTP {status}: {err.get('message', data)}"
    code = err.get("code")
    cls = {404: NotFound, 409: Conflict, 401: Unauthorized}.get(status)
    if cls is None:
        cls = ValidationFailed if 400 <= status < 500 else SdfleetError
    return cls(message, code=code)


async def wait_with_progress(client: AsyncClient, task_id: str, console: Console) -> dict[str, Any]:
    """Poll until the task ends: a progress bar on a terminal; piped, one plain line per new state."""
    if not console.is_terminal:
        return await _wait_plain(client, task_id, console)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"))
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=False) as bar:
        handle = bar.add_task(f"{task_id} queued", total=1.0)
        while True:
            view = await client.poll(task_id)
            bar.update(handle, completed=view["progress"], description=f"{task_id} {view['state']}")
            if view["state"] in TERMINAL:
                return view
            await asyncio.sleep(0.25)


async def _wait_plain(client: AsyncClient, task_id: str, console: Console) -> dict[str, Any]:
    state = None
    while True:
        view = await client.poll(task_id)
        if view["state"] in TERMINAL:
            return view  # the caller prints the outcome
        if view["state"] != state:
            state = view["state"]
            console.print(f"{task_id} {state}", highlight=False)
        await asyncio.sleep(0.25)
