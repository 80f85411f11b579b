"""Result notifications on the bus's results topic (SNS results topic on AWS)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sdfleet.bus.base import Bus
from sdfleet.compat.notify import SeedShape
from sdfleet.notify import formats
from sdfleet.notify.formats import NotifyFormat
from sdfleet.routing import ATTR_TASK_ID, ATTR_TENANT
from sdfleet.tasks import EventType, TaskEvent, TaskRecord

Locate = Callable[[str], str]


class TopicNotifier:
    """Publishes terminal events, and with ``running`` the start of each task too (the seed's
    ``EXP_CALLBACK_WHEN_RUNNING``), in the task's notification format (``notify.formats``): the
    seed's formats keep their subscribers working, SageMaker's serves subscribers of an async
    endpoint, v1 tasks get a ``TaskEvent``."""

    def __init__(
        self,
        bus: Bus,
        topic: str,
        seed_shape: SeedShape,
        *,
        locate: Locate,
        queue_format: NotifyFormat | None = None,
        running: bool = False,
    ) -> None:
        self.bus = bus
        self.topic = topic
        self.seed_shape = seed_shape
        self.locate = locate
        """Storage key → the location subscribers are told (``s3://…`` on S3)."""
        self.queue_format = queue_format
        self.running = running

    async def notify(self, record: TaskRecord, event: TaskEvent) -> None:
        started = event.type is EventType.STARTED
        if not (event.state.terminal or (started and self.running)):
            return
        body = self._body(record, event, formats.format_of(record, self.queue_format))
        if body is None:
            return
        attrs = {
            ATTR_TASK_ID: record.id,
            ATTR_TENANT: record.tenant,
            "state": event.state.value,
            "origin": record.task.origin.value,
        }
        await self.bus.publish(self.topic, json.dumps(body).encode(), attrs)

    def _body(self, record: TaskRecord, event: TaskEvent, fmt: NotifyFormat) -> dict[str, Any] | None:
        started = event.type is EventType.STARTED
        if fmt == "sdfleet":
            return event.model_dump(mode="json", by_alias=True)
        if fmt == "seed":
            return formats.seed_running(record) if started else dict(self.seed_shape(record, event))
        if started:
            return None  # SageMaker has no "running" notification
        output = record.result.output if record.result else None
        location = self.locate(output) if output else None
        return formats.sagemaker(record, event, location, record.task.queue or "")

    async def delivered(self, task_id: str) -> None:
        return None  # published inside notify

    async def aclose(self) -> None:
        return None
