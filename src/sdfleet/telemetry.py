"""Prometheus metrics (one registry per process, passed around, never global) and JSON logs."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("queue_wait", "inputs_fetch", "model_switch", "runtime_run", "storage_put")


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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "botocore", "urllib3", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
