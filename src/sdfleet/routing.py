"""From a task to the bus: message attributes, the topology a fleet implies, the queue a task lands in."""

from __future__ import annotations

import time
from collections.abc import Mapping

from sdfleet.bus.base import QueueSpec, Subscription, Topology
from sdfleet.errors import ValidationFailed
from sdfleet.settings import FleetConfig
from sdfleet.tasks import Task

# Attributes the seed routes on (its SNS filter policies use these names) plus our own.
ATTR_MODEL = "sd_model_checkpoint"
ATTR_RUNTIME = "runtime"
ATTR_TENANT = "tenant"
ATTR_TIER = "tenant_tier"
ATTR_TYPE = "task_type"
ATTR_TASK_ID = "task_id"
ATTR_ENQUEUED_AT = "enqueued_at"
ATTR_PRIORITY = "priority"  # one of the bus's NUMBER_ATTRIBUTES: numeric filter policies match it


def task_attributes(task: Task, *, tier: str = "standard") -> dict[str, str]:
    """Message attributes for a task. SNS refuses empty values, so absent fields are left out."""
    attrs = {
        ATTR_TASK_ID: task.id,
        ATTR_TENANT: task.tenant,
        ATTR_TIER: tier,
        ATTR_TYPE: task.type.value,
        ATTR_PRIORITY: str(task.priority),
    }
    if task.model:
        attrs[ATTR_MODEL] = task.model
    if task.runtime:
        attrs[ATTR_RUNTIME] = task.runtime
    return attrs


def stamp(attributes: dict[str, str]) -> dict[str, str]:
    """Add the enqueue time, which the agent turns into the queue-wait metric."""
    return {**attributes, ATTR_ENQUEUED_AT: f"{time.time():.6f}"}


def enqueued_at(attributes: Mapping[str, str]) -> float | None:
    """The enqueue time ``stamp`` put in ``attributes``; None when absent or not a number (a
    message another producer published)."""
    try:
        return float(attributes[ATTR_ENQUEUED_AT])
    except (KeyError, ValueError):
        return None


def fleet_topology(fleet: FleetConfig) -> Topology:
    """The topics, queues and subscriptions a fleet file describes. Each subscription holds the
    queue's effective policy (``disjoint.effective_filters``): its filter minus what the queues
    before it take, so a task reaches exactly one queue, the first whose filter accepts it."""
    from sdfleet.disjoint import effective_filters

    queues = [
        QueueSpec(name=q.name, lease_s=fleet.retry.lease_s, max_receives=fleet.retry.max_receives)
        for q in fleet.queues
    ]
    subs = [
        Subscription(topic=fleet.tasks_topic, queue=q.name, filter_policy=e.policy, scope=e.scope)
        for q, e in zip(fleet.queues, effective_filters(fleet.queues), strict=True)
    ]
    if fleet.results_queue:
        queues.append(QueueSpec(name=fleet.results_queue, lease_s=30, max_receives=100))
        subs.append(Subscription(topic=fleet.results_topic, queue=fleet.results_queue))
    return Topology(topics=[fleet.tasks_topic, fleet.results_topic], queues=queues, subscriptions=subs)


def resolve_queues(
    fleet: FleetConfig, task: Task, attributes: dict[str, str], topology: Topology | None = None
) -> list[str]:
    """The task queues a task would reach, as the bus will route it. Raises ``ValidationFailed`` when
    none would take it (a silent drop otherwise) or when the client named a queue it cannot reach.
    ``topology``: ``fleet_topology(fleet)``, when the caller keeps it (the API: once per process)."""
    from sdfleet.policy import matching_queues

    topology = topology or fleet_topology(fleet)
    queues = matching_queues(topology.subscriptions, fleet.tasks_topic, attributes, task.to_message())
    if not queues:
        raise ValidationFailed(
            f"no queue accepts this task (model={task.model!r}, runtime={task.runtime!r}, "
            f"priority={task.priority}); "
            f"queues: {', '.join(q.name for q in fleet.queues)}",
            code="no_route",
        )
    if task.queue is not None and task.queue not in queues:
        known = {q.name for q in fleet.queues}
        reason = "unknown queue" if task.queue not in known else "its filter policy does not accept this task"
        raise ValidationFailed(f"queue {task.queue!r}: {reason}", code="bad_queue")
    return queues
