"""Result notifications on the bus's results topic (SNS results topic on AWS)."""

from __future__ import annotations

import json
from collections.abc import Callable

from sdfleet.bus.base import Bus
from sdfleet.routing import ATTR_TASK_ID, ATTR_TENANT
from sdfleet.tasks import Origin, TaskEvent, TaskRecord

SeedShape = Callable[[TaskRecord, TaskEvent], dict[str, object]]


class TopicNotifier:
    """Publishes terminal events. Tasks that came in through the seed's formats get the seed's
    notification shape (``seed_shape``), so existing subscribers keep working; others get ``TaskEvent``."""

    def __init__(self, bus: Bus, topic: str, seed_shape: SeedShape) -> None:
        self.bus = bus
        self.topic = topic
        self.seed_shape = seed_shape

    async def notify(self, record: TaskRecord, event: TaskEvent) -> None:
        if not event.state.terminal:
            return
        if record.task.origin is Origin.V1:
            body = event.model_dump_json(by_alias=True).encode()
        else:
            body = json.dumps(self.seed_shape(record, event)).encode()
        attrs = {
            ATTR_TASK_ID: record.id,
            ATTR_TENANT: record.tenant,
            "state": record.state.value,
            "origin": record.task.origin.value,
        }
        await self.bus.publish(self.topic, body, attrs)

    async def delivered(self, task_id: str) -> None:
        return None  # published inside notify

    async def aclose(self) -> None:
        return None
