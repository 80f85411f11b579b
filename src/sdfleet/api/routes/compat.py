"""The seed's endpoints, unchanged on the wire: ``POST /v1alpha1/`` and ``POST /v1alpha2/``.

With API keys in use, a tenant's results are stored under its own name whatever ``save_dir`` or
``prefix`` it sends (``<tenant>/<save_dir>/<id>/``), so no tenant can write into another's
prefix; without keys (one tenant) the seed's layout is kept as it is. ``output_location`` is the
seed's ``s3://bucket/key`` on S3 and the API's own files URL on local storage, never a path on the
server.
"""

from __future__ import annotations

from types import ModuleType

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from sdfleet.api.auth import Caller, caller
from sdfleet.api.body import read_object
from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.api.links import public_location
from sdfleet.api.openapi import SUBMIT_ERRORS, errors
from sdfleet.api.seed_schemas import V1alpha1Answer, V1alpha2Answer, check_types
from sdfleet.api.submit import submit
from sdfleet.compat import v1alpha1, v1alpha2
from sdfleet.errors import Conflict, ValidationFailed, validation_errors
from sdfleet.tasks import Task

router = APIRouter(tags=["seed compatibility"])


def tenant_prefix(who: Caller, prefix: str) -> str:
    """``prefix`` inside the caller's own namespace when tenants are told apart by keys."""
    if not who.authenticated or prefix == who.tenant or prefix.startswith(f"{who.tenant}/"):
        return prefix
    return f"{who.tenant}/{prefix}"


async def _submit_seed(request: Request, ctx: ApiContext, who: Caller, fmt: ModuleType) -> JSONResponse:
    """Both seed formats: parse, submit like any task, answer in the seed's own shape (HTTP 200)."""
    _, data = await read_object(request, ctx.settings.max_body_bytes, ctx.settings.body_timeout_s)
    task: Task = fmt.to_task(data, tenant=who.tenant)  # the seed's checks, in its own words, first
    try:
        check_types(data, fmt.__name__.rsplit(".", 1)[-1])
    except ValidationError as e:
        raise ValidationFailed(validation_errors(e, whole="body")) from e
    task.output_prefix = tenant_prefix(who, task.storage_prefix())
    # The seed runs every POST anew: an id whose task finished runs again (its next run); a repeat
    # of one still queued or running answers as the first did (a safe retry, nothing run twice).
    record, created = await submit(ctx, who, task, request.headers, rerun_finished=True)
    if not created and record.task.origin is not task.origin:
        raise Conflict(
            f"id {record.id!r} is a {record.task.origin.value} task (now {record.state.value}): "
            f"a {task.origin.value} task needs another id",
            code="id_in_use",
        )
    location = public_location(ctx, request, f"{record.task.storage_prefix()}/{record.id}")
    return JSONResponse(fmt.answer(record.task, location), status_code=200)


@router.post(
    "/v1alpha1/",
    include_in_schema=True,
    response_model=V1alpha1Answer,
    responses=errors(*SUBMIT_ERRORS),
)
@router.post("/v1alpha1", include_in_schema=False)
async def submit_v1alpha1(
    request: Request, ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller)
) -> JSONResponse:
    """The A1111 payload with ``alwayson_scripts: {task, sd_model_checkpoint, id_task, save_dir}``."""
    return await _submit_seed(request, ctx, who, v1alpha1)


@router.post(
    "/v1alpha2/",
    include_in_schema=True,
    response_model=V1alpha2Answer,
    responses=errors(*SUBMIT_ERRORS),
)
@router.post("/v1alpha2", include_in_schema=False)
async def submit_v1alpha2(
    request: Request, ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller)
) -> JSONResponse:
    """``{"task": {"metadata": {id, runtime, tasktype, prefix, context}, "content": {...}}}``."""
    return await _submit_seed(request, ctx, who, v1alpha2)
