"""The shapes a results-topic notification can take: sdfleet's ``TaskEvent``, the seed's agent's
message, or Amazon SageMaker asynchronous inference's notification (so subscribers written for a
SageMaker async endpoint read sdfleet's results unchanged).

Chosen per task (``Task.notify_format``), else per queue (``queues[].notify_format``), else by the
API the task came in through: v1 → ``sdfleet``, the seed's formats → ``seed``.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any, Literal

from sdfleet.compat import _common
from sdfleet.tasks import Origin, TaskEvent, TaskRecord, TaskState

NotifyFormat = Literal["sdfleet", "seed", "sagemaker"]


def format_of(record: TaskRecord, queue_format: NotifyFormat | None) -> NotifyFormat:
    if record.task.notify_format is not None:
        return record.task.notify_format
    if queue_format is not None:
        return queue_format
    return "sdfleet" if record.task.origin is Origin.V1 else "seed"


def seed_running(record: TaskRecord) -> dict[str, Any]:
    """The seed agent's "running" message (its ``EXP_CALLBACK_WHEN_RUNNING``)."""
    runtime = record.task.runtime or record.task.queue or record.runtime or ""
    return _common.running_notification(record, runtime)


def sagemaker(record: TaskRecord, event: TaskEvent, output_url: str | None, endpoint: str) -> dict[str, Any]:
    """SageMaker asynchronous inference's success or error notification for a finished task: the
    documented fields (``invocationStatus``, ``responseParameters.outputLocation`` or
    ``failureReason``, ``inferenceId``…), ``endpointName`` being the queue that ran it."""
    ok = event.state is TaskState.SUCCEEDED
    body: dict[str, Any] = {
        "awsRegion": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "",
        "eventTime": _iso(time.time()),
        "receivedTime": _iso(record.task.created_at),
        "invocationStatus": "Completed" if ok else "Failed",
        "requestParameters": {"contentType": "application/json", "endpointName": endpoint},
        "inferenceId": record.id,
        "eventVersion": "1.0",
        "eventSource": "aws:sagemaker",
        "eventName": "InferenceResult",
    }
    if ok:
        body["responseParameters"] = {"contentType": "application/json", "outputLocation": output_url}
    else:
        error = record.error
        reason = f"{error.code}: {error.message}" if error else event.state.value
        body["failureReason"] = f"ClientError: {reason}" if event.state is TaskState.FAILED else reason
    return body


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"
