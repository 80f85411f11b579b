"""Prometheus metrics (one registry per process, passed around, never global), JSON logs, and
OpenTelemetry traces that cross the queue in message attributes (``traceparent``)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = (
    "queue_wait",
    "inputs_fetch",
    "pool_wait",
    "runtime_wait",
    "model_switch",
    "runtime_run",
    "storage_put",
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tasks = Counter(
            "sdfleet_tasks", "Tasks finished by an agent, by state", ["queue", "state"], registry=r
        )
        self.submitted = Counter(
            "sdfleet_submitted", "Tasks accepted by the API", ["queue", "origin"], registry=r
        )
        self.stage_seconds = Histogram(
            "sdfleet_stage_seconds",
            "Seconds spent per stage of a task",
            ["queue", "stage"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.model_switches = Counter(
            "sdfleet_model_switches", "Model switches by agents", ["queue"], registry=r
        )
        self.queue_visible = Gauge("sdfleet_queue_visible", "Messages waiting", ["queue"], registry=r)
        self.queue_in_flight = Gauge("sdfleet_queue_in_flight", "Messages leased", ["queue"], registry=r)
        self.queue_oldest_age = Gauge(
            "sdfleet_queue_oldest_age_seconds", "Age of the oldest", ["queue"], registry=r
        )
        self.busy = Gauge("sdfleet_runtime_busy", "1 while the runtime is generating", ["queue"], registry=r)

    def set_queue(self, queue: str, visible: int, in_flight: int, oldest_age_s: float | None) -> None:
        self.queue_visible.labels(queue=queue).set(visible)
        self.queue_in_flight.labels(queue=queue).set(in_flight)
        self.queue_oldest_age.labels(queue=queue).set(oldest_age_s or 0.0)

    def observe_stages(self, queue: str, timings: Mapping[str, float]) -> None:
        for stage, seconds in timings.items():
            self.stage_seconds.labels(queue=queue, stage=stage).observe(seconds)


class JsonFormatter(logging.Formatter):
    """One JSON object a line; ``extra={"task_id": ...}`` fields are kept."""

    _skip = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", json_logs: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(TraceIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "botocore", "urllib3", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


# --- tracing -------------------------------------------------------------------------------------
# OpenTelemetry's tracer provider is process-global by design; ``setup_tracing`` is called once by
# the CLI. Without it spans are no-ops and nothing is exported.

TRACER_NAME = "sdfleet"


def setup_tracing(
    service: str, otlp_endpoint: str | None = None, exporter: SpanExporter | None = None
) -> None:
    """Record spans; export them over OTLP/HTTP when ``otlp_endpoint`` is set (ADOT/X-Ray collector)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject(attributes: dict[str, str]) -> dict[str, str]:
    """Add ``traceparent`` (and ``tracestate``) of the current span to message attributes."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {**attributes, **{k: v for k, v in carrier.items() if k in ("traceparent", "tracestate")}}


def extract(attributes: Mapping[str, str]) -> Context:
    """The trace context a message carried across the queue."""
    return propagate.extract(dict(attributes))


class TraceIdFilter(logging.Filter):
    """Puts the current trace id (and the task id of a task's span) on every log record, so JSON
    logs join up with traces."""

    def filter(self, record: logging.LogRecord) -> bool:
        span = trace.get_current_span()
        ctx = span.get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            task_id = (getattr(span, "attributes", None) or {}).get("sdfleet.task_id")
            if task_id and not hasattr(record, "task_id"):
                record.task_id = task_id
        return True
