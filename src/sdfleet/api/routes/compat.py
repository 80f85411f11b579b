"""The seed's endpoints, unchanged: ``POST /v1alpha1/`` and ``POST /v1alpha2/``."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from sdfleet.api.auth import Caller, caller
from sdfleet.api.body import read_json
from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.api.submit import submit
from sdfleet.compat import v1alpha1, v1alpha2
from sdfleet.errors import ValidationFailed

router = APIRouter(tags=["seed compatibility"])


async def _body(request: Request, ctx: ApiContext) -> dict[str, Any]:
    data = await read_json(request, ctx.settings.max_body_bytes)
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object")
    return data


async def _submit_seed(request: Request, ctx: ApiContext, who: Caller, fmt: ModuleType) -> JSONResponse:
    """Both seed formats: parse, submit like any task, answer in the seed's own shape (HTTP 200)."""
    task = fmt.to_task(await _body(request, ctx), tenant=who.tenant)
    record, _ = await submit(ctx, who, task, request.headers)
    location = ctx.storage.location(f"{record.task.storage_prefix()}/{record.id}")
    return JSONResponse(fmt.answer(record.task, location), status_code=200)


@router.post("/v1alpha1/", include_in_schema=True)
@router.post("/v1alpha1", include_in_schema=False)
async def submit_v1alpha1(
    request: Request, ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller)
) -> JSONResponse:
    """The A1111 payload with ``alwayson_scripts: {task, sd_model_checkpoint, id_task, save_dir}``."""
    return await _submit_seed(request, ctx, who, v1alpha1)


@router.post("/v1alpha2/", include_in_schema=True)
@router.post("/v1alpha2", include_in_schema=False)
async def submit_v1alpha2(
    request: Request, ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller)
) -> JSONResponse:
    """``{"task": {"metadata": {id, runtime, tasktype, prefix, context}, "content": {...}}}``."""
    return await _submit_seed(request, ctx, who, v1alpha2)
