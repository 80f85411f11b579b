"""Reading request bodies with our limits and our error codes (400 malformed, 413 too large, 422 invalid)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from sdfleet import jsonsafe
from sdfleet.errors import PayloadTooLarge, ValidationFailed

M = TypeVar("M", bound=BaseModel)


async def read_json(request: Request, max_bytes: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"payload is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"payload is over the limit of {max_bytes} bytes")
    try:
        return jsonsafe.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValidationFailed(f"malformed JSON: {e}", code="malformed_json") from e


def validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        got = "" if err["type"] == "value_error" else _got(err.get("input"))  # our own messages say it
        parts.append(f"{where}: {err['msg']}{got}")
    return "; ".join(parts)


def _got(value: Any) -> str:
    """The offending value, when it is short enough to quote (the client sees what it sent)."""
    if isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 64):
        return f" (got {value!r})"
    return ""


def parse(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ValidationFailed(validation_message(e)) from e
