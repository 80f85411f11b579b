"""A real OTLP/HTTP trace receiver on 127.0.0.1, as a collector's ``otlp`` receiver takes traces.

``POST /v1/traces`` with a binary protobuf ``ExportTraceServiceRequest`` (gzip or not), decoded
with ``opentelemetry-proto``; answered with an ``ExportTraceServiceResponse`` (200), 415 for a
content type other than ``application/x-protobuf``, 404 elsewhere. Spans are kept, flattened,
for the test to read.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    """32 hex digits."""
    span_id: str
    parent_id: str
    """16 hex digits; empty for a root span."""
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: int
    """``Status.StatusCode``: 0 unset, 1 ok, 2 error."""

    @property
    def task_id(self) -> Any:
        return self.attributes.get("sdfleet.task_id")


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def decode(body: bytes) -> list[Span]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = []
    for rs in request.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    Span(
                        service=str(resource.get("service.name", "")),
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        status=s.status.code,
                    )
                )
    return out


class OtlpReceiver:
    """``with OtlpReceiver() as r:`` serve on ``r.endpoint`` (the traces URL) until the block ends."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.endpoint = f"http://127.0.0.1:{self.port}/v1/traces"
        self.spans: list[Span] = []
        self.requests = 0
        self.refused: list[str] = []
        """``METHOD path`` of requests that were not trace exports (metrics, logs, anything else)."""
        self._lock = threading.Lock()
        config = uvicorn.Config(
            self._app, host="127.0.0.1", port=self.port, log_config=None, lifespan="off", interface="asgi3"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the OTLP receiver did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def wait_for(self, done: Callable[[list[Span]], bool], timeout_s: float = 30.0) -> list[Span]:
        """The spans received once ``done(spans)`` holds; AssertionError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                spans = list(self.spans)
            if done(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({(s.name, s.task_id) for s in spans}, key=str)
                raise AssertionError(f"spans never complete after {timeout_s}s; got {names}")
            time.sleep(0.05)

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if scope["method"] != "POST" or scope["path"] != "/v1/traces":
            with self._lock:
                self.refused.append(f"{scope['method']} {scope['path']}")
            await _answer(send, 404, b"", "text/plain")
            return
        if headers.get("content-type", "").split(";")[0].strip() != PROTOBUF:
            await _answer(send, 415, b"unsupported content type", "text/plain")
            return
        if headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        spans = decode(body)
        with self._lock:
            self.requests += 1
            self.spans.extend(spans)
        await _answer(send, 200, ExportTraceServiceResponse().SerializeToString(), PROTOBUF)


async def _answer(send: Any, status: int, body: bytes, content_type: str) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
