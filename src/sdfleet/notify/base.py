"""Notifiers tell the outside world a task finished: a results topic on the bus, webhooks."""

from __future__ import annotations

from typing import Protocol

from sdfleet.tasks import TaskEvent, TaskRecord


class Notifier(Protocol):
    async def notify(self, record: TaskRecord, event: TaskEvent) -> None:
        """Deliver ``event`` for ``record``, or hand it to the notifier's own background retries.
        Raises an ``SdfleetError`` (the bus's, for a results topic) when it could not be handed
        on; the agent logs it and goes on: a lost notification does not undo a finished task."""

    async def delivered(self, task_id: str) -> None:
        """Returns once the events of ``task_id`` sent so far are delivered or given up (at once for
        a notifier that delivers inside ``notify``). The agent acks a task's delivery only then, so
        a crash before that redelivers the task and its terminal event is sent again."""

    async def aclose(self) -> None: ...
