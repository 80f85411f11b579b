"""When a task's ``ttl_s`` runs out (``agent.expiry``): counted from the submit, the task's own
limit before its queue's, and never for a task whose run has started."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sdfleet.agent.expiry import overdue, start_by
from sdfleet.settings import QueueConfig
from sdfleet.tasks import Task, TaskRecord, TaskState


def test_the_limit_counts_from_the_earlier_of_the_submit_and_the_first_enqueue() -> None:
    api_task = Task(created_at=1000.0, ttl_s=30)
    assert start_by(api_task, None, None, enqueued_at=1000.2) == 1030.0
    # Another producer's message: the agent made the Task when it read it, later than the publish.
    foreign = Task(created_at=1500.0)
    assert start_by(foreign, None, 60, enqueued_at=1000.0) == 1060.0


def test_the_tasks_own_limit_wins_over_the_queues_and_none_is_no_limit() -> None:
    assert start_by(Task(created_at=0.0, ttl_s=3600), None, 1, 0.0) == 3600.0
    assert start_by(Task(created_at=0.0), None, 5, 0.0) == 5.0
    assert start_by(Task(created_at=0.0), None, None, 0.0) is None
    assert not overdue(None, now=1e12)


def test_a_run_that_started_is_not_cut_off_but_a_retry_is() -> None:
    task = Task(created_at=0.0, ttl_s=10)
    running = TaskRecord(task=task, state=TaskState.RUNNING, attempts=1)
    assert start_by(task, running, None, 0.0) is None  # a takeover continues that run
    retry = TaskRecord(task=task, state=TaskState.QUEUED, attempts=1)  # released after a failed attempt
    deadline = start_by(task, retry, None, 0.0)
    assert deadline == 10.0 and overdue(deadline, now=10.5) and not overdue(deadline, now=9.5)


def test_a_queues_ttl_is_positive_and_at_most_a_day() -> None:
    assert QueueConfig(name="q", ttl_s=86_400).ttl_s == 86_400
    for bad in (0, -5, 86_401):
        with pytest.raises(ValidationError, match="ttl_s"):
            QueueConfig(name="q", ttl_s=bad)


def test_a_later_run_counts_from_its_own_message_not_the_ids_first_submit() -> None:
    """A seed id sent again, or a redrive, runs as run 2 with the id's first ``created_at``."""
    second = Task(created_at=0.0, ttl_s=10, run=2)
    assert start_by(second, None, None, enqueued_at=5000.0) == 5010.0
