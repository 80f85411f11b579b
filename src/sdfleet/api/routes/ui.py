"""``/ui``: a gallery of the caller's tasks, a task page and a submit form.

Server-rendered Jinja2 pages with a little JavaScript (``api/ui/static``). The pages hold no data:
the script asks the API for it with the key the person entered (kept in the browser's session
storage, sent as ``X-API-Key``), through ``GET /v1/tasks``, ``GET /v1/tasks/{id}``, the SSE stream
and ``POST /v1/tasks[/{id}/cancel]``. Two JSON routes add what those lack for a page: a task's
parameters and ``.out`` JSON, and thumbnails (made once, stored next to the images).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel

from sdfleet.api.auth import Caller, caller
from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.api.links import file_url, linked_out
from sdfleet.api.routes.tasks import owned
from sdfleet.api.thumbs import ensure_thumbnail
from sdfleet.errors import NotFound, SdfleetError, ValidationFailed
from sdfleet.settings import ApiSettings
from sdfleet.tasks import TaskParams, TaskRecord, TaskState

router = APIRouter(prefix="/ui", tags=["gallery"], include_in_schema=False)
home = APIRouter(include_in_schema=False)
"""``/``: where a browser pointed at the API's address lands."""

HERE = Path(__file__).resolve().parent.parent / "ui"
STATIC = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")
_STATIC_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*\.(js|css|svg)$")
_STATIC_FILES = frozenset(p.name for p in STATIC.iterdir() if p.is_file() and _STATIC_NAME.match(p.name))
MAX_IDS = 100
# The page talks only to this origin; images may come from presigned S3 URLs.
CSP = (
    "default-src 'self'; img-src 'self' data: https: http:; connect-src 'self'; "
    "script-src 'self'; style-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_HIDDEN_PARAMS = ("init_images", "workflow")
_SHOWN_MAX = 512
"""Longest inpainting ``mask`` the task page shows as sent (a URL); a longer one is inline data."""


def _page(request: Request, template: str, **context: Any) -> HTMLResponse:
    base = str(request.scope.get("root_path", "")).rstrip("/")  # links stay relative to this host
    response = templates.TemplateResponse(request, template, {"base": base, **context})
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


_FORM_FIELDS = ("width", "height", "steps", "cfg_scale", "seed", "denoising_strength")


@functools.cache
def _model_bounds() -> dict[str, dict[str, float | None]]:
    """The task model's own ``min``, ``max`` and default of each number of the form (its JSON
    schema, made once: it does not change while the process runs)."""
    props = TaskParams.model_json_schema()["properties"]
    fields: dict[str, dict[str, float | None]] = {}
    for name in _FORM_FIELDS:
        p = props[name]
        high = p.get("maximum", p["exclusiveMaximum"] - 1 if "exclusiveMaximum" in p else None)
        fields[name] = {"min": p.get("minimum"), "max": high, "value": p["default"]}
    return fields


def form_fields(settings: ApiSettings) -> dict[str, dict[str, float | None]]:
    """The submit form's ``min``, ``max`` and starting ``value`` of each number: the task model's
    own bounds and defaults, and this API's size limit, so the browser refuses only what the API
    would and offers all it takes."""
    fields = {name: dict(bounds) for name, bounds in _model_bounds().items()}
    fields["width"]["max"] = settings.max_width
    fields["height"]["max"] = settings.max_height
    return fields


@home.get("/")
async def root() -> RedirectResponse:
    """The gallery: a person who opens the API's address in a browser met a JSON 404."""
    return RedirectResponse("/ui", status_code=307)


@router.get("", response_class=HTMLResponse)
async def gallery(request: Request, ctx: ApiContext = Depends(get_ctx)) -> HTMLResponse:
    """The grid of the caller's tasks, newest first, with filters and a submit form."""
    return _page(request, "gallery.html", title="Gallery", form=form_fields(ctx.settings))


@router.get("/tasks/{task_id}", response_class=HTMLResponse)
async def task_page(request: Request, task_id: str) -> HTMLResponse:
    """One task: parameters, every image full size, the ``.out`` JSON, live progress, cancel."""
    return _page(request, "task.html", title=f"Task {task_id}", task_id=task_id)


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    # Looked up among the files shipped, never on the disk: a name over NAME_MAX was an OSError (500).
    if name not in _STATIC_FILES:
        raise NotFound(f"no static file {name[:64]!r}")
    return FileResponse(STATIC / name, headers={"Cache-Control": "public, max-age=300"})


class Card(BaseModel):
    """What a gallery card shows beyond ``GET /v1/tasks``: the prompt, the size, the thumbnails."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    thumbs: list[str]


class Cards(BaseModel):
    cards: dict[str, Card]
    """By task id; ids that are not the caller's (or do not exist) are left out."""


@router.get("/api/cards", response_model=Cards)
async def cards(
    request: Request,
    ids: str = Query(..., description="Comma-separated task ids"),
    ctx: ApiContext = Depends(get_ctx),
    who: Caller = Depends(caller),
) -> Cards:
    wanted = [i for i in dict.fromkeys(ids.split(",")) if i]
    if len(wanted) > MAX_IDS:
        raise ValidationFailed(f"at most {MAX_IDS} ids at once, got {len(wanted)}")
    out: dict[str, Card] = {}
    for task_id in wanted:
        try:
            record = await owned(ctx, who, task_id)
        except (NotFound, ValidationFailed):
            continue
        p = record.task.params
        thumbs = await _thumbs(ctx, request, record)
        out[task_id] = Card(
            prompt=p.prompt,
            negative_prompt=p.negative_prompt,
            width=p.width,
            height=p.height,
            steps=p.steps,
            thumbs=thumbs,
        )
    return Cards(cards=out)


async def _thumbs(ctx: ApiContext, request: Request, record: TaskRecord) -> list[str]:
    if record.state is not TaskState.SUCCEEDED or record.result is None:
        return []
    urls = []
    for key in record.result.images:
        thumb = await ensure_thumbnail(ctx.storage, key)
        urls.append(await _link(ctx, request, record, thumb or key))
    return urls


async def _link(ctx: ApiContext, request: Request, record: TaskRecord, key: str) -> str:
    """A link to a file of ``record``'s (the one place the gallery makes links)."""
    return await file_url(ctx, request, record.tenant, key)


class Detail(BaseModel):
    """What the task page shows beyond ``GET /v1/tasks/{id}``."""

    params: dict[str, Any]
    """The task's parameters, inputs left out (they can be large)."""
    runtime: str | None
    worker: str | None
    output: Any
    """The ``.out`` JSON, once the task has one."""


@router.get("/api/tasks/{task_id}", response_model=Detail)
async def detail(
    task_id: str, request: Request, ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller)
) -> Detail:
    record = await owned(ctx, who, task_id)
    params = record.task.params.model_dump(exclude=set(_HIDDEN_PARAMS))
    params["inputs"] = len(record.task.params.init_images)
    mask = params["extra"].get("mask")
    if isinstance(mask, str) and (mask.startswith("data:") or len(mask) > _SHOWN_MAX):
        params["extra"]["mask"] = f"an image ({len(mask):,} characters)"  # inline: megabytes of text
    if record.result is not None and record.result.seed is not None:
        params["seed"] = record.result.seed  # the one used (asked -1: random), to make it again
    output = None
    if record.result is not None and record.result.output:
        key = record.result.output
        try:
            # As ``/v1/files`` serves it: the images as working links, not paths on the server.
            data = await linked_out(ctx, request, record.tenant, key, await ctx.storage.get(key))
            output = json.loads(data)
        except (SdfleetError, ValueError):
            output = None
    return Detail(params=params, runtime=record.runtime, worker=record.worker, output=output)
