"""Prometheus metrics (one registry per process, passed around, never global), JSON logs, and
OpenTelemetry traces that cross the queue in message attributes (``traceparent``) and continue
AWS X-Ray traces (``X-Amzn-Trace-Id`` headers, SQS ``AWSTraceHeader``) with X-Ray-compatible ids."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.aws import AwsXRayPropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sdfleet.tasks import Origin

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from sdfleet.bus.base import QueueStats

STAGES = (
    "queue_wait",
    "inputs_fetch",
    "pool_wait",
    "runtime_wait",
    "model_switch",
    "runtime_run",
    "encode",
    "storage_put",
)
"""Stages of ``sdfleet_stage_seconds`` (and of a record's ``timings``); see docs/observability.md."""
FINAL_STATES = ("succeeded", "failed")
"""States ``sdfleet_tasks_total`` counts."""


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tasks = Counter(
            "sdfleet_tasks", "Tasks finished by an agent, by state", ["queue", "state"], registry=r
        )
        self.ttl_expired = Counter(
            "sdfleet_tasks_ttl_expired",
            "Tasks an agent failed unrun because their ttl_s had passed (also in sdfleet_tasks_total)",
            ["queue"],
            registry=r,
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
        self.queue_dead_letters = Gauge(
            "sdfleet_queue_dead_letters", "Messages in the queue's dead-letter queue", ["queue"], registry=r
        )
        self.busy = Gauge("sdfleet_runtime_busy", "1 while the runtime is generating", ["queue"], registry=r)
        self.prefetch_limit = Gauge(
            "sdfleet_agent_prefetch_limit",
            "Tasks the agent may hold ahead of its runtime (prefetch, bounded by prefetch_horizon_s)",
            ["queue"],
            registry=r,
        )
        self.gpu_seconds = Counter(
            "sdfleet_gpu_seconds",
            "Device seconds of the agent's runtime calls (model switches and runs), by queue",
            ["queue"],
            registry=r,
        )
        self.deleted = Counter(
            "sdfleet_tasks_deleted", "Tasks deleted through DELETE /v1/tasks/{id}", ["queue"], registry=r
        )
        self.agent = Gauge(
            "sdfleet_agent_info",
            "1 per running agent, by queue and runtime",
            ["queue", "runtime"],
            registry=r,
        )

    def start_api(self, queues: Iterable[str]) -> None:
        """The API's series at 0 from the start: a queue nobody submitted to yet graphs as 0, not
        "No data", and ``increase()`` counts the first submit (it needs a sample before it)."""
        for queue in queues:
            self.deleted.labels(queue=queue)
            for origin in Origin:
                self.submitted.labels(queue=queue, origin=origin.value)

    def start_agent(self, queue: str, runtime: str) -> None:
        """An agent's series at 0 from the start (see ``start_api``); an idle agent reports."""
        for state in FINAL_STATES:
            self.tasks.labels(queue=queue, state=state)
        for stage in STAGES:
            self.stage_seconds.labels(queue=queue, stage=stage)
        self.model_switches.labels(queue=queue)
        self.ttl_expired.labels(queue=queue)
        self.gpu_seconds.labels(queue=queue)
        self.busy.labels(queue=queue).set(0)
        self.agent.labels(queue=queue, runtime=runtime).set(1)

    def set_queue(self, queue: str, stats: QueueStats) -> None:
        self.queue_visible.labels(queue=queue).set(stats.visible)
        self.queue_in_flight.labels(queue=queue).set(stats.in_flight)
        self.queue_oldest_age.labels(queue=queue).set(stats.oldest_age_s or 0.0)
        self.queue_dead_letters.labels(queue=queue).set(stats.dead_letters)

    def observe_stages(self, queue: str, timings: Mapping[str, float]) -> None:
        """Observe the ``STAGES`` among ``timings`` (a record's timings also say ``gpu_seconds``)."""
        for stage, seconds in timings.items():
            if stage in STAGES:
                self.stage_seconds.labels(queue=queue, stage=stage).observe(seconds)


class JsonFormatter(logging.Formatter):
    """One JSON object a line; ``extra={"task_id": ...}`` fields are kept."""

    # uvicorn's ``color_message`` is its message again with ANSI colours: noise in a JSON line
    _skip = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}

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


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler on whatever ``sys.stderr`` is when a record comes, not the one at setup: a caller
    that swaps it for a while (click's test runner, which closes its own afterwards) does not
    leave every later record failing on a closed stream."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging(level: str = "INFO", json_logs: bool = True) -> None:
    handler = _Stderr()
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


def adopt_library_logs(name: str) -> None:
    """Send the records of library ``name`` through this process's handler alone. huggingface_hub
    gives its logger a plain stderr handler of its own at import and still propagates, so each of
    its warnings came out twice, once as plain text beside the JSON line."""
    lib = logging.getLogger(name)
    lib.handlers[:] = [h for h in lib.handlers if type(h) is not logging.StreamHandler]
    lib.propagate = True


# --- tracing -------------------------------------------------------------------------------------
# OpenTelemetry's tracer provider is process-global by design; ``setup_tracing`` is called once by
# the CLI. Without it spans are no-ops and nothing is exported.

TRACER_NAME = "sdfleet"
XRAY_HEADER = "X-Amzn-Trace-Id"
"""The X-Ray trace header of HTTP requests (API Gateway, ALB, X-Ray SDKs)."""
SQS_TRACE_ATTRIBUTE = "AWSTraceHeader"
"""The SQS system attribute that carries an X-Ray trace header (SNS or Lambda put it there)."""
_W3C = TraceContextTextMapPropagator()
_XRAY = AwsXRayPropagator()


def setup_tracing(
    service: str, otlp_endpoint: str | None = None, exporter: SpanExporter | None = None
) -> None:
    """Record spans with X-Ray-compatible ids (the first 32 bits of a trace id are its start time,
    as X-Ray requires); export them over OTLP/HTTP when ``otlp_endpoint`` is set (ADOT collector)."""
    from opentelemetry.sdk.extension.aws.trace import AwsXRayIdGenerator
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(
        resource=Resource.create({"service.name": service}), id_generator=AwsXRayIdGenerator()
    )
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
    _W3C.inject(carrier)
    return {**attributes, **carrier}


def extract(carrier: Mapping[str, str]) -> Context:
    """The trace a request or message continues: its W3C ``traceparent`` (and ``tracestate``) when
    valid, else its X-Ray trace header (``X-Amzn-Trace-Id``, or an SQS ``AWSTraceHeader``) when it
    names a parent; an empty context (a new trace) otherwise. Keys are matched case-insensitively."""
    lowered = {k.lower(): v for k, v in carrier.items()}
    ctx = _W3C.extract(lowered)
    if trace.get_current_span(ctx).get_span_context().is_valid:
        return ctx
    header = lowered.get(XRAY_HEADER.lower()) or lowered.get(SQS_TRACE_ATTRIBUTE.lower())
    if header:
        return _XRAY.extract({XRAY_HEADER: header})
    return Context()


def xray_trace_id(trace_id: int) -> str:
    """``trace_id`` as X-Ray writes it (``1-<8 hex: start time>-<24 hex>``), to search in X-Ray."""
    hex32 = format(trace_id, "032x")
    return f"1-{hex32[:8]}-{hex32[8:]}"


def fastapi_options() -> dict[str, Any]:
    """``FastAPI(**fastapi_options())``: FastAPI's own OpenTelemetry (0.142 and later) off. It would
    wrap ``api.submit`` in an HTTP span, trace every ``/metrics`` scrape, probe and poll, and add
    exporters from ``OTEL_*`` variables (by default in 0.142); sdfleet traces what a task does (see
    docs/observability.md), the same on every FastAPI version it allows."""
    import inspect

    from fastapi import FastAPI

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    off = ("tracing", "metrics", "logs", "operation_spans", "auto_configure")
    return {"telemetry": dict.fromkeys(off, False)}


class TraceIdFilter(logging.Filter):
    """Puts the current trace id (and the task id of a task's span) on every log record, so JSON
    logs join up with traces."""

    def filter(self, record: logging.LogRecord) -> bool:
        span = trace.get_current_span()
        ctx = span.get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.xray_trace_id = xray_trace_id(ctx.trace_id)
            task_id = (getattr(span, "attributes", None) or {}).get("sdfleet.task_id")
            if task_id and not hasattr(record, "task_id"):
                record.task_id = task_id
        return True
