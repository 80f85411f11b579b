"""``/v1/tasks``: submit, read, list, cancel."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from sdfleet.api.auth import Caller, caller
from sdfleet.api.body import parse, read_json
from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.api.links import file_url
from sdfleet.api.submit import submit
from sdfleet.errors import NotFound, TransitionConflict
from sdfleet.store.base import transition
from sdfleet.tasks import Task, TaskError, TaskParams, TaskRecord, TaskState, TaskType, Webhook

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])


class TaskRequest(BaseModel):
    """A generation request in sdfleet's own form."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="Client id: an idempotency key per tenant")
    type: TaskType = TaskType.TEXT_TO_IMAGE
    model: str | None = None
    runtime: str | None = None
    params: TaskParams = Field(default_factory=TaskParams)
    priority: int = 0
    queue: str | None = None
    webhook: Webhook | None = None
    context: Any = None
    timeout_s: float | None = Field(None, gt=0, le=3600)
    notify_format: Literal["sdfleet", "seed", "sagemaker"] | None = Field(
        None, description="Shape of the results-topic notification; default the queue's (sdfleet)"
    )

    def to_task(self) -> Task:
        data = self.model_dump(exclude_none=True)
        return Task.model_validate(data)


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


async def task_view(ctx: ApiContext, request: Request, r: TaskRecord) -> TaskView:
    res = r.result
    images = [ImageView(key=k, url=await file_url(ctx, request, k)) for k in (res.images if res else [])]
    output = None
    if res is not None and res.output:
        output = ImageView(key=res.output, url=await file_url(ctx, request, res.output))
    return TaskView(
        id=r.id,
        tenant=r.tenant,
        state=r.state,
        type=r.task.type,
        model=r.task.model,
        queue=r.task.queue,
        attempts=r.attempts,
        progress=r.progress,
        error=r.error,
        images=images,
        output=output,
        seed=res.seed if res else None,
        timings=res.timings if res else {},
        context=r.task.context,
        created_at=r.task.created_at,
        updated_at=r.updated_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
    )


async def owned(ctx: ApiContext, who: Caller, task_id: str) -> TaskRecord:
    """The caller's record, or 404 — another tenant's task is indistinguishable from a missing one."""
    record = await ctx.store.get(task_id)
    if record is None or record.tenant != who.tenant:
        raise NotFound(f"task {task_id!r} not found")
    return record


@router.post("", status_code=202, response_model=TaskView)
async def create_task(
    request: Request, response: Response, ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller)
) -> TaskView:
    req = parse(TaskRequest, await read_json(request, ctx.settings.max_body_bytes))
    record, created = await submit(ctx, who, req.to_task(), request.headers)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/tasks/{record.id}"
    return await task_view(ctx, request, record)


@router.get("/{task_id}", response_model=TaskView)
async def get_task(
    task_id: str, request: Request, ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller)
) -> TaskView:
    return await task_view(ctx, request, await owned(ctx, who, task_id))


class TaskPage(BaseModel):
    tasks: list[TaskView]
    cursor: str | None


@router.get("", response_model=TaskPage)
async def list_tasks(
    request: Request,
    state: TaskState | None = None,
    cursor: str | None = None,
    limit: int = Query(50, ge=1, le=500),
    ctx: ApiContext = Depends(get_ctx),
    who: Caller = Depends(caller),
) -> TaskPage:
    # A bad cursor is the stores' ValidationFailed (422); anything else is not the client's fault.
    records, next_cursor = await ctx.store.list(who.tenant, state=state, cursor=cursor, limit=limit)
    return TaskPage(tasks=[await task_view(ctx, request, r) for r in records], cursor=next_cursor)


@router.post("/{task_id}/cancel", response_model=TaskView)
async def cancel_task(
    task_id: str, request: Request, ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller)
) -> TaskView:
    await owned(ctx, who, task_id)

    def mutate(r: TaskRecord) -> TaskRecord:
        r.state = TaskState.CANCELLED
        r.finished_at = time.time()
        return r

    try:
        record = await transition(ctx.store, task_id, mutate)
    except TransitionConflict as e:
        raise TransitionConflict(f"task {task_id} cannot be cancelled: {e}") from e
    return await task_view(ctx, request, record)
