"""The OpenAPI document: error responses, security schemes, and the request bodies the routes read
themselves (with our size and depth limits), held to what the server accepts.

``errors(...)`` gives a route its documented error responses; ``install`` replaces the app's
``openapi()`` so that the document also carries the request bodies, the API-key schemes and the
limits that depend on settings (largest size, queue names).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from sdfleet.settings import ApiSettings, FleetConfig

IMAGE_FORMAT = "image-input"
"""``format`` of input-image strings: an http(s) URL (``seed_schemas.URL_PATTERN``), a ``data:``
URL or base64 of a PNG, JPEG or WebP image."""


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail


_WHAT = {
    400: "Malformed JSON, or a value a record cannot keep (`1e400`, a lone surrogate escape)",
    401: "Missing or unknown API key",
    403: "The tenant may not do this (a `priority` over its `max_priority`)",
    404: "Not found (another tenant's task is not found either)",
    408: "Body not received whole within `api.body_timeout_s`",
    409: "Conflict (the task has ended; the client id is being submitted by another request)",
    413: "Body over `api.max_body_bytes`",
    415: "An encoded body (`Content-Encoding` other than `identity`)",
    422: "Invalid request: the message says what to fix",
    429: "Over the tenant's `rate_limit` or `max_in_flight`; retry after `Retry-After` seconds",
    503: (
        "An engine (bus, store, storage) is unavailable, or a webhook's host could not be looked up"
        " just now; retry later"
    ),
}
SUBMIT_ERRORS = (400, 401, 403, 408, 409, 413, 415, 422, 429, 503)


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error responses ``codes`` of a route."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ErrorBody, "description": _WHAT[code]}
        if code == 429:
            out[code]["headers"] = {
                "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer", "minimum": 1}}
            }
    return out


def _components(models: list[type[BaseModel]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (`sdfleet keys create`, or a key of `tenants` in sdfleet.yaml). "
        "Needed once any tenant or key exists; before that every caller is tenant `default`.",
    },
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The same key"},
}
PUBLIC = {"/healthz", "/readyz", "/v1/files/{key}", "/metrics"}


def _secure(doc: dict[str, Any]) -> None:
    doc.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    doc["security"] = [{"bearer": []}, {"apiKey": []}]
    for path, ops in doc["paths"].items():
        if path in PUBLIC:
            for op in ops.values():
                op["security"] = []


def install(
    app: FastAPI,
    settings: ApiSettings,
    fleet: FleetConfig,
    bodies: dict[tuple[str, str], type[BaseModel]],
    tighten: Callable[[dict[str, Any], ApiSettings, FleetConfig], None],
    also: tuple[type[BaseModel], ...] = (),
) -> None:
    """Make ``app.openapi()`` return the full document: ``bodies`` maps (path, method) to the model
    of the JSON body that route reads itself, ``also`` are schemas those refer to by hand;
    ``tighten`` adds the constraints the server checks beyond the models (given the components,
    settings and fleet)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        components.update(_components([*bodies.values(), *also]))
        for (path, method), model in bodies.items():
            content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
            doc["paths"][path][method]["requestBody"] = {"required": True, "content": content}
        tighten(components, settings, fleet)
        _secure(doc)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
