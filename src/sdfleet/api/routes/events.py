"""``GET /v1/tasks/{id}/events``: a task's life as Server-Sent Events.

The stream polls the task store (no extra infrastructure) and sends one event per observed change:
``queued``, ``started``, ``progress``, then ``succeeded``/``failed``/``cancelled``, after which it
ends. Each event's ``id:`` is the record's version, so a client that reconnects with
``Last-Event-ID`` gets only what changed since. Changes closer together than the poll interval
come as one event (the latest state). ``data:`` is the ``TaskEvent`` JSON, with signed file links.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import StreamingResponse

from sdfleet.api.auth import Caller, caller
from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.api.links import file_url
from sdfleet.api.openapi import errors
from sdfleet.api.routes.tasks import TaskId, owned
from sdfleet.errors import SdfleetError, ValidationFailed, worded
from sdfleet.tasks import EventType, TaskEvent, TaskRecord, TaskState

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

SSE_EVENT = {
    "type": "object",
    "description": "One event of the stream",
    "required": ["data"],
    "properties": {
        "event": {"type": "string", "enum": [e.value for e in EventType]},
        "id": {
            "type": "string",
            "pattern": worded("^[0-9]+$", "digits"),
            "description": "The record's version",
        },
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/TaskEvent"},
        },
    },
}
LAST_EVENT_ID = worded(r"^\s*([0-9]{1,18})?\s*$", "an event id: the digits of an 'id:' line this stream sent")
POLL_S = 0.25
KEEPALIVE_S = 15.0


def event_type(prev: TaskRecord | None, cur: TaskRecord) -> EventType | None:
    """The event a change from ``prev`` (None: nothing seen on this connection) to ``cur`` stands for."""
    if cur.state is not TaskState.RUNNING:
        if prev is not None and prev.state is cur.state:
            return None  # a write that changed no state (a re-publish of a queued task)
        return EventType(cur.state.value)
    if prev is None:
        # A resumed stream cannot tell whether the client saw the start: progress implies it.
        return EventType.PROGRESS if cur.progress > 0 else EventType.STARTED
    if prev.state is not TaskState.RUNNING or prev.attempts != cur.attempts:
        return EventType.STARTED
    if cur.progress != prev.progress:
        return EventType.PROGRESS
    return None


async def _frame(ctx: ApiContext, request: Request, r: TaskRecord, kind: EventType) -> str:
    keys = r.result.images if r.result else []
    urls = [await file_url(ctx, request, r.tenant, k) for k in keys]
    event = TaskEvent.of_record(r, kind, urls).model_copy(update={"at": r.updated_at})
    return f"id: {r.version}\nevent: {kind.value}\ndata: {event.model_dump_json(by_alias=True)}\n\n"


async def stream(
    ctx: ApiContext,
    request: Request,
    record: TaskRecord,
    last_id: int | None,
    *,
    poll_s: float = POLL_S,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncGenerator[str, None]:
    """The SSE text of ``record``'s changes after version ``last_id``, until it is terminal."""
    yield "retry: 1000\n\n"
    seen = -1 if last_id is None else last_id
    prev: TaskRecord | None = None
    quiet_since = time.monotonic()
    current: TaskRecord | None = record
    while current is not None:
        if current.version > seen:
            seen = current.version
            kind = event_type(prev, current)
            if kind is not None:
                yield await _frame(ctx, request, current, kind)
                quiet_since = time.monotonic()
        prev = current
        if current.state.terminal:
            return
        if time.monotonic() - quiet_since >= keepalive_s:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(poll_s)
        try:
            current = await ctx.store.get(record.tenant, record.id)
        except SdfleetError as e:  # the client reconnects with Last-Event-ID and resumes
            log.warning("event stream of %s ended: %s", record.id, e)
            return


def _last_event_id(raw: str | None) -> int | None:
    if raw is None or not raw.strip():
        return None
    if not raw.strip().isdigit() or not raw.strip().isascii() or len(raw.strip()) > 18:
        raise ValidationFailed(f"Last-Event-ID must be an event id of this stream, got {raw!r}")
    return int(raw)


@router.get(
    "/{task_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}, "description": "Server-Sent Events"},
        **errors(401, 404, 422, 503),
    },
)
async def task_events(
    task_id: TaskId,
    request: Request,
    ctx: ApiContext = Depends(get_ctx),
    who: Caller = Depends(caller),
    last_event_id: str = Header("", pattern=LAST_EVENT_ID, description="Resume after this event id"),
) -> StreamingResponse:
    """Follow a task: ``queued``, ``started``, ``progress``, then a terminal event that ends the stream."""
    last_id = _last_event_id(last_event_id)
    record = await owned(ctx, who, task_id)
    return StreamingResponse(
        stream(ctx, request, record, last_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
