"""Which queues a class of requests lands in: the API's own attributes and the real filter engine.

Each class is routed once, as ``POST /v1/tasks`` would route it (``routing.task_attributes`` →
``policy.matching_queues`` over the fleet's subscriptions). The subscriptions hold each queue's
effective policy (its filter minus what the queues before it take), so a class reaches exactly one
queue, the first whose filter accepts it, or none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from sdfleet.errors import ConfigError, Reject, ValidationFailed, validation_errors
from sdfleet.routing import resolve_queues, task_attributes
from sdfleet.runtimes.unsupported import refuse
from sdfleet.settings import FleetConfig
from sdfleet.simulate.trace import TaskClass
from sdfleet.tasks import Task, TaskParams, TaskType


@dataclass
class Routes:
    """Per class index: the queues it reaches (empty: refused at submit, ``no_route``)."""

    queues: list[list[str]]
    unrouted: list[TaskClass] = field(default_factory=list)


def route_classes(fleet: FleetConfig, classes: list[TaskClass]) -> Routes:
    routes = Routes([])
    for c in classes:
        try:
            params = TaskParams(
                prompt="simulated", width=c.width, height=c.height, steps=c.steps, batch_size=c.images
            )
        except ValidationError as e:
            raise ConfigError(f"the API would refuse {c}: {validation_errors(e)}") from e
        task = Task(tenant=c.tenant, model=c.model or fleet.models.default, params=params)
        try:
            queues = resolve_queues(fleet, task, task_attributes(task, tier=c.tier))
        except ValidationFailed:
            queues = []
            routes.unrouted.append(c)
        for queue in [q for q in fleet.queues if q.name in queues[:1]]:  # the queue it is sent to
            try:
                refuse(queue.runtime, TaskType.TEXT_TO_IMAGE, params)  # as the API asks at submit
            except Reject as e:
                raise ConfigError(f"the API would refuse {c}: {e.reason}") from e
        routes.queues.append(queues)
    return routes
