"""``/v1/tasks``: submit, read, list, cancel."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sdfleet.api.auth import Caller, caller
from sdfleet.api.body import parse_strict, read_object
from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.api.links import file_url
from sdfleet.api.openapi import SUBMIT_ERRORS, errors
from sdfleet.api.seed_schemas import INPUTS_MAX, NAME_MAX, TEXT_MAX
from sdfleet.api.submit import submit
from sdfleet.api.wait import preferred_wait, until_finished
from sdfleet.errors import NotFound, TransitionConflict
from sdfleet.store.base import expires_at, transition
from sdfleet.tasks import (
    PRIORITY_MAX,
    TASK_ID_PATTERN,
    TTL_MAX_S,
    Integer,
    Task,
    TaskError,
    TaskParams,
    TaskRecord,
    TaskState,
    TaskType,
    Webhook,
)

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])
PREFER = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "description": "`wait=N` (N ≤ 60): answer with the finished task if it ends within N seconds",
    "schema": {"type": "string"},
}
PAGE_CURSOR = "page-cursor"
"""``format`` of list cursors: opaque tokens of the task store."""
TaskId = Annotated[str, Path(pattern=TASK_ID_PATTERN, description="Task id (ids are per tenant)")]


class TaskRequest(BaseModel):
    """A generation request in sdfleet's own form."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(
        None, pattern=TASK_ID_PATTERN, description="Client id: an idempotency key of the tenant"
    )
    type: TaskType = TaskType.TEXT_TO_IMAGE
    model: str | None = Field(None, min_length=1, max_length=NAME_MAX)
    runtime: str | None = Field(None, min_length=1, max_length=NAME_MAX)
    params: TaskParams = Field(default_factory=TaskParams)
    priority: Integer = Field(
        0,
        ge=0,
        le=PRIORITY_MAX,
        description="Higher runs sooner: the `priority` message attribute (a number) that filter "
        "policies route priority lanes by, and the order an agent runs the tasks it holds in",
    )
    queue: str | None = None
    webhook: Webhook | None = None
    context: Any = Field(None, description="Anything; echoed back (JSON nested at most 64 levels)")
    timeout_s: float | None = Field(None, gt=0, le=3600)
    ttl_s: float | None = Field(
        None,
        gt=0,
        le=TTL_MAX_S,
        description="Seconds from the submit within which a run must start; past them the task "
        "ends `failed` with code `ttl_expired`, never run. Default: the queue's `ttl_s`, else no limit",
    )
    notify_format: Literal["sdfleet", "seed", "sagemaker"] | None = Field(
        None, description="Shape of the results-topic notification; default the queue's (sdfleet)"
    )

    @model_validator(mode="after")
    def _bounded(self) -> TaskRequest:
        """The bounds the seed's formats have (``seed_schemas``), on fields ``TaskParams`` leaves
        open because records and other producers' messages are read with it."""
        p = self.params
        for name, limit in (("prompt", TEXT_MAX), ("negative_prompt", TEXT_MAX)):
            if len(getattr(p, name)) > limit:
                raise ValueError(f"params.{name} is over {limit} characters")
        for name in ("sampler", "upscaler"):
            value = getattr(p, name)
            if value is not None and not 1 <= len(value) <= NAME_MAX:
                raise ValueError(f"params.{name} must be 1 to {NAME_MAX} characters")
        if len(p.init_images) > INPUTS_MAX:
            raise ValueError(f"params.init_images holds {len(p.init_images)} images; at most {INPUTS_MAX}")
        return self

    def to_task(self) -> Task:
        """The ``Task`` (its own defaults for what the request left out). Everything here was
        validated already, so it is not validated again; ``id`` counts as given only if it was."""
        given = {name: value for name, value in self if value is not None}
        return Task.model_construct(_fields_set=set(given), **given)


class ImageView(BaseModel):
    key: str
    url: str


class TaskView(BaseModel):
    id: str
    tenant: str
    state: TaskState
    type: TaskType
    model: str | None
    queue: str | None
    priority: int = 0
    ttl_s: float | None = None
    """The task's ``ttl_s``, else its queue's: a run must start within it of ``created_at`` (a
    later run of the id: of that run's own submit)."""
    run: int
    """Which run of this id (a seed-format id sent again after it finished runs again, and
    ``sdfleet dlq redrive`` runs a failed task's next run)."""
    attempts: int
    progress: float
    error: TaskError | None
    images: list[ImageView]
    output: ImageView | None
    seed: int | None
    timings: dict[str, float]
    context: Any
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None = None
    """When this finished task is no longer kept (``fleet.retain_days``): from then on this view
    is 404 and the id free; on ``file://`` storage its files go too, up to an hour later. None
    while it can still change, or where tasks are kept for ever."""


async def task_view(ctx: ApiContext, request: Request, r: TaskRecord) -> TaskView:
    res = r.result

    async def link(key: str) -> ImageView:
        return ImageView(key=key, url=await file_url(ctx, request, r.tenant, key))

    images = [await link(k) for k in (res.images if res else [])]
    return TaskView(
        id=r.id,
        tenant=r.tenant,
        state=r.state,
        type=r.task.type,
        model=r.task.model,
        queue=r.task.queue,
        priority=r.task.priority,
        ttl_s=_ttl_s(ctx, r.task),
        run=r.task.run,
        attempts=r.attempts,
        progress=r.progress,
        error=r.error,
        images=images,
        output=await link(res.output) if res is not None and res.output else None,
        seed=res.seed if res else None,
        timings=res.timings if res else {},
        context=r.task.context,
        created_at=r.task.created_at,
        updated_at=r.updated_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
        expires_at=expires_at(r, ctx.fleet.retain_s),
    )


def _ttl_s(ctx: ApiContext, task: Task) -> float | None:
    queue = ctx.fleet.queue(task.queue) if task.queue else None
    return task.ttl_or(queue.ttl_s if queue is not None else None)


async def owned(ctx: ApiContext, who: Caller, task_id: str) -> TaskRecord:
    """The caller's record, or 404: ids are per tenant, so another tenant's task is not even
    looked at."""
    record = await ctx.store.get(who.tenant, task_id)
    if record is None:
        raise NotFound(f"task {task_id!r} not found")
    return record


@router.post(
    "",
    status_code=202,
    response_model=TaskView,
    responses={
        200: {
            "model": TaskView,
            "description": "The task of a repeated client id, or finished within `Prefer: wait`",
        },
        **errors(*SUBMIT_ERRORS),
    },
    openapi_extra={"parameters": [PREFER]},
)
async def create_task(request: Request) -> Response:
    """Submit a task: `202` and `Location` at once; `200` with the first task for a repeated client
    `id`; with `Prefer: wait=N`, `200` and the finished task if it ends within N seconds."""
    # The busiest route: its context and caller are looked up here rather than through FastAPI's
    # dependency solving, and its view is serialised once (the OpenAPI document says the same).
    ctx = await get_ctx(request)
    who = await caller(request, ctx)
    body, _ = await read_object(request, ctx.settings.max_body_bytes, ctx.settings.body_timeout_s)
    req = parse_strict(TaskRequest, body)
    record, created = await submit(ctx, who, req.to_task(), request.headers)
    status = 202 if created else 200
    headers = {"Location": f"/v1/tasks/{record.id}"}
    wait = preferred_wait(request)
    if wait is not None and not record.state.terminal:
        record = await until_finished(ctx, record, wait)
        headers["Preference-Applied"] = f"wait={wait}"
    view = await task_view(ctx, request, record)
    # 200 for a finished task only when the client asked to wait for it: without ``Prefer: wait``
    # a new task is 202 even if an agent adopted and finished it before its record was written.
    finished = wait is not None and record.state.terminal
    return Response(
        view.model_dump_json(),
        status_code=200 if finished else status,
        headers=headers,
        media_type="application/json",
    )


@router.get("/{task_id}", response_model=TaskView, responses=errors(401, 404, 422, 503))
async def get_task(
    request: Request,
    task_id: TaskId,
    ctx: ApiContext = Depends(get_ctx),
    who: Caller = Depends(caller),
) -> TaskView:
    """A task's state, progress, error and result links."""
    return await task_view(ctx, request, await owned(ctx, who, task_id))


class TaskPage(BaseModel):
    tasks: list[TaskView]
    cursor: str | None


@router.get("", response_model=TaskPage, responses=errors(401, 422, 503))
async def list_tasks(
    request: Request,
    state: TaskState | None = None,
    cursor: str | None = Query(
        None,
        max_length=1024,
        description="The `cursor` of the previous page (opaque; a made-up one is a 422)",
        json_schema_extra={"format": PAGE_CURSOR},
    ),
    limit: int = Query(50, ge=1, le=500),
    ctx: ApiContext = Depends(get_ctx),
    who: Caller = Depends(caller),
) -> TaskPage:
    """The caller's tasks, newest first; `cursor` from the previous page gets the next one."""
    # A bad cursor is the stores' ValidationFailed (422); anything else is not the client's fault.
    records, next_cursor = await ctx.store.list(who.tenant, state=state, cursor=cursor, limit=limit)
    return TaskPage(tasks=[await task_view(ctx, request, r) for r in records], cursor=next_cursor)


_ENDED = {
    TaskState.SUCCEEDED: "it has already succeeded",
    TaskState.FAILED: "it has already failed",
    TaskState.CANCELLED: "it was cancelled already",
}
"""Why a task that has ended cannot be cancelled, in its state's words."""


@router.post("/{task_id}/cancel", response_model=TaskView, responses=errors(401, 404, 409, 422, 503))
async def cancel_task(
    request: Request,
    task_id: TaskId,
    ctx: ApiContext = Depends(get_ctx),
    who: Caller = Depends(caller),
) -> TaskView:
    """Cancel a queued or running task (a running one is interrupted); `409` once it has ended."""
    await owned(ctx, who, task_id)

    def mutate(r: TaskRecord) -> TaskRecord:
        if r.state.terminal:
            raise TransitionConflict(f"task {task_id} cannot be cancelled: {_ENDED[r.state]}")
        r.state = TaskState.CANCELLED
        r.finished_at = time.time()
        return r

    record = await transition(ctx.store, who.tenant, task_id, mutate)
    return await task_view(ctx, request, record)


@router.delete("/{task_id}", status_code=204, responses=errors(401, 404, 409, 422, 503))
async def delete_task(
    task_id: TaskId,
    ctx: ApiContext = Depends(get_ctx),
    who: Caller = Depends(caller),
) -> Response:
    """Delete a finished task now: its images, its `.out` and their thumbnails (and the files of
    its earlier runs and unfinished tries), then its record (`404` from then on, and the id free
    again). `409` while it is queued or running (cancel it first). Files first: a delete cut
    short leaves the record, and deleting again finishes it."""
    record = await owned(ctx, who, task_id)
    if not record.state.terminal:
        raise TransitionConflict(f"task {task_id} is {record.state}: cancel it first, then delete it")
    # Every run and try of this id names its files <id>-<tag>… (images, `.out`, the gallery's
    # thumbnails beside them) directly in its results folder, the record's result among them; a
    # subfolder there is another task's (one whose prefix ends in this id).
    mine = f"{task_id}-"
    files = await ctx.storage.files(record.task.results_folder())
    await ctx.storage.delete([k for k in files if k.rpartition("/")[2].startswith(mine)])
    if not await ctx.store.delete(who.tenant, task_id, record.version) and (
        await ctx.store.get(who.tenant, task_id) is not None
    ):
        # Written meanwhile: a seed-format id sent again reopened it, and that run is not this
        # delete's. (Gone all the same is done: this delete's own, its reply lost and the call
        # sent again by the engine's client, or another delete, or its expiry just then.)
        raise TransitionConflict(f"task {task_id} changed while being deleted; read it and try again")
    ctx.metrics.deleted.labels(queue=record.task.queue or "").inc()
    return Response(status_code=204)
