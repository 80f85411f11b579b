"""Errors in SD WebUI's bodies: ``{"error", "detail", "body", "errors"}``, and FastAPI's 422 list.

SD WebUI answers its own refusals as ``HTTPException`` with a ``detail`` and the errors it did not
foresee as the exception's name with ``errors`` = its message (often with status 500, even for a
client's mistake). This server keeps those names and words, and answers client mistakes with 4xx
(docs/runtimes.md lists where the status differs from SD WebUI's).
"""

from __future__ import annotations

import ast
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from sdfleet.errors import NotFound, Reject, SdfleetError, ValidationFailed

log = logging.getLogger(__name__)


class SdApiError(Exception):
    """One answer in SD WebUI's error body."""

    def __init__(
        self,
        status: int,
        detail: str = "",
        *,
        error: str = "HTTPException",
        errors: str = "",
        sdwebui: int | None = None,
    ) -> None:
        super().__init__(detail or errors)
        self.status = status
        self.sdwebui = sdwebui
        """SD WebUI's own status for this case, where it differs (500 for many client mistakes)."""
        self.detail = detail
        self.error = error
        self.errors = errors

    def response(self, sdwebui_status: bool = False) -> JSONResponse:
        body = {"error": self.error, "detail": self.detail, "body": "", "errors": self.errors}
        status = self.sdwebui if sdwebui_status and self.sdwebui is not None else self.status
        return JSONResponse(status_code=status, content=body)


def refused(status: int, detail: str, *, sdwebui: int | None = None) -> SdApiError:
    """A refusal SD WebUI words as ``HTTPException(detail=...)``."""
    return SdApiError(status, detail, sdwebui=sdwebui)


def failed(status: int, name: str, message: str, *, sdwebui: int | None = None) -> SdApiError:
    """An error SD WebUI reports as an exception ``name`` with ``errors`` = its message."""
    return SdApiError(status, error=name, errors=message, sdwebui=sdwebui)


def invalid_image() -> SdApiError:
    return refused(400, "Invalid encoded image", sdwebui=500)


# pydantic v2 error types → pydantic v1's (SD WebUI 1.10 runs pydantic 1): what clients parse.
_V1_TYPES = {
    "int_parsing": ("value is not a valid integer", "type_error.integer"),
    "int_type": ("value is not a valid integer", "type_error.integer"),
    "int_from_float": ("value is not a valid integer", "type_error.integer"),
    "float_parsing": ("value is not a valid float", "type_error.float"),
    "float_type": ("value is not a valid float", "type_error.float"),
    "bool_parsing": ("value could not be parsed to a boolean", "type_error.bool"),
    "bool_type": ("value could not be parsed to a boolean", "type_error.bool"),
    "string_type": ("str type expected", "type_error.str"),
    "list_type": ("value is not a valid list", "type_error.list"),
    "dict_type": ("value is not a valid dict", "type_error.dict"),
    "missing": ("field required", "value_error.missing"),
}


# pydantic v2 bound errors → v1's words: (v2's ctx key, the words, v1's type suffix).
_V1_BOUNDS = {
    "greater_than": ("gt", "greater than", "not_gt"),
    "greater_than_equal": ("ge", "greater than or equal to", "not_ge"),
    "less_than": ("lt", "less than", "not_lt"),
    "less_than_equal": ("le", "less than or equal to", "not_le"),
}


def _v1_error(error: Any, body: Any = None) -> dict[str, Any]:
    """One item of FastAPI's 422 list as pydantic 1 writes it (``body``: the request's text, for a
    body that is not JSON: pydantic 1 says where it broke, in ``json``'s words)."""
    loc, kind = list(error.get("loc", ())), str(error.get("type", ""))
    ctx = error.get("ctx") or {}
    if kind == "json_invalid" and isinstance(body, str) and loc and isinstance(loc[-1], int):
        e = json.JSONDecodeError(str(ctx.get("error", "")), body, loc[-1])
        where = {"msg": e.msg, "doc": e.doc, "pos": e.pos, "lineno": e.lineno, "colno": e.colno}
        return {"loc": loc, "msg": str(e), "type": "value_error.jsondecode", "ctx": where}
    if kind in _V1_BOUNDS:
        key, words, suffix = _V1_BOUNDS[kind]
        limit = _number(ctx.get(key))
        return {
            "loc": loc,
            "msg": f"ensure this value is {words} {limit}",
            "type": f"value_error.number.{suffix}",
            "ctx": {"limit_value": limit},
        }
    if kind == "literal_error":
        permitted = _literals(str(ctx.get("expected", "")))
        return {
            "loc": loc,
            "msg": "unexpected value; permitted: " + ", ".join(repr(v) for v in permitted),
            "type": "value_error.const",
            "ctx": {"given": error.get("input"), "permitted": permitted},
        }
    if kind.endswith("_type") and "input" in error and error["input"] is None:
        return {"loc": loc, "msg": "none is not an allowed value", "type": "type_error.none.not_allowed"}
    msg, v1_kind = _V1_TYPES.get(kind, (str(error.get("msg", "")), kind))
    return {"loc": loc, "msg": msg, "type": v1_kind}


def _number(value: Any) -> Any:
    """A bound as the model declares it: pydantic 2 hands a float field's ``gt=0`` back as 0.0."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _literals(expected: str) -> list[Any]:
    """The permitted values of pydantic 2's ``expected`` text (``0 or 1``, ``'a', 'b' or 'c'``)."""
    head, _, last = expected.rpartition(" or ")
    items = [*head.split(", "), last] if head else [last]
    try:
        return [ast.literal_eval(item) for item in items]
    except (ValueError, SyntaxError):
        return items


def _reject_error(e: Reject) -> SdApiError:
    if e.code == "unknown_model":
        return failed(404, "RuntimeError", e.reason, sdwebui=500)
    if e.code == "invalid_image":
        return invalid_image()
    if e.code in ("unknown_upscaler", "bad_upscaler"):  # SD WebUI: 500 AssertionError
        return failed(422, "AssertionError", e.reason, sdwebui=500)
    return refused(422, e.reason)


def install(app: FastAPI, *, sdwebui_status: bool = False) -> None:
    """SD WebUI's error bodies for every error this server answers; with ``sdwebui_status``, its
    status codes too (500 for the client mistakes SD WebUI answers with 500)."""

    @app.exception_handler(SdApiError)
    async def sd_api(_: Request, e: SdApiError) -> JSONResponse:
        return e.response(sdwebui_status)

    @app.exception_handler(RequestValidationError)
    async def unprocessable(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": [_v1_error(x, e.body) for x in e.errors()]})

    @app.exception_handler(Reject)
    async def reject(_: Request, e: Reject) -> JSONResponse:
        return _reject_error(e).response(sdwebui_status)

    @app.exception_handler(ValidationFailed)
    async def invalid(_: Request, e: ValidationFailed) -> JSONResponse:
        return refused(422, e.message).response()

    @app.exception_handler(SdfleetError)
    async def sdfleet_failed(_: Request, e: SdfleetError) -> JSONResponse:
        status = 404 if isinstance(e, NotFound) else 500
        return failed(status, type(e).__name__, e.message or str(e)).response()
