"""One log line per change in a task's life on an agent (received, started, succeeded, failed,
requeued, cancelled, dropped, and for a seed publish waiting on another of its id: waiting,
deferred), each with its task id, trace id, queue and what explains it: a successful task's story
is readable at INFO without a trace backend."""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace

from sdfleet.telemetry import xray_trace_id

log = logging.getLogger("sdfleet.agent.task")


def task_event(
    task_id: str,
    queue: str,
    span: trace.Span | None,
    event: str,
    *,
    level: int = logging.INFO,
    **fields: Any,
) -> None:
    """Log ``event`` of ``task_id``; ``fields`` go into the JSON line and, briefly, the message."""
    extra: dict[str, Any] = {"task_id": task_id, "queue": queue, "event": event, **fields}
    ctx = span.get_span_context() if span is not None else None
    if ctx is not None and ctx.is_valid:
        extra["trace_id"] = format(ctx.trace_id, "032x")
        extra["xray_trace_id"] = xray_trace_id(ctx.trace_id)
    brief = ", ".join(f"{k}={_short(v)}" for k, v in fields.items())
    log.log(level, "task %s %s%s", task_id, event, f" ({brief})" if brief else "", extra=extra)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)
