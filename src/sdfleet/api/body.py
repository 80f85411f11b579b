"""Reading request bodies with our limits and our error codes (400 malformed, 408 too slow, 413 too
large, 415 encoded, 422 invalid)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from sdfleet import jsonsafe
from sdfleet.errors import (
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    ValidationFailed,
    validation_errors,
)

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The raw body, refused past ``max_bytes`` (413) whether or not a length was declared, when
    it is not all there within ``timeout_s`` (408), or when it is encoded (415: bodies are read
    as they come, never inflated)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding[:32]!r} is not accepted; send the JSON as it is"
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"payload is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise PayloadTooLarge(f"payload is over the limit of {max_bytes} bytes")
    except TimeoutError as e:
        raise RequestTimeout(f"the body was not received within {timeout_s:g} s") from e
    except ClientDisconnect as e:  # nobody reads the answer; what matters is no traceback
        raise ValidationFailed("the client left before sending the whole body", code="incomplete_body") from e
    return bytes(body)


def loads(body: bytes) -> Any:
    """JSON within the one nesting limit (``jsonsafe``); 400 ``malformed_json`` otherwise."""
    try:
        return jsonsafe.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValidationFailed(f"malformed JSON: {e}", code="malformed_json") from e


async def read_object(request: Request, max_bytes: int, timeout_s: float) -> tuple[bytes, dict[str, Any]]:
    """The raw body and its JSON, which must be an object."""
    body = await read_body(request, max_bytes, timeout_s)
    data = loads(body)
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object")
    return body, data


def parse(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ValidationFailed(validation_errors(e, whole="body")) from e


def parse_strict(model: type[M], body: bytes) -> M:
    """``body`` (already checked by ``loads``) as ``model``, types as declared: ``"20"`` is not
    an integer, as the OpenAPI document says."""
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as e:
        raise ValidationFailed(validation_errors(e, whole="body")) from e
