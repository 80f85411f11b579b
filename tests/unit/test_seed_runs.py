"""Which run of a finished id a seed message is: the seed's messages do not number their runs, so
the drop-in agent tells the Lambda's next publish from the finished run's own message by the
publish (``TaskRecord.message_id``), and only records that do not name one by the receive count."""

from __future__ import annotations

import pytest

from sdfleet.agent.prepare import _numbered
from sdfleet.bus.base import Delivery
from sdfleet.tasks import Task, TaskRecord, TaskState
from seed_payloads import sns_envelope


def _delivery(receive_count: int, *, bus_id: str, sns_id: str | None) -> Delivery:
    body = b"{}" if sns_id is None else sns_envelope("{}", {}, message_id=sns_id)
    return Delivery("dynamic", bus_id, body, {}, receive_count, "r", 0.0)


def _record(state: TaskState, message_id: str | None) -> TaskRecord:
    return TaskRecord(task=Task(id="seed-1", run=3), state=state, message_id=message_id)


@pytest.mark.parametrize(
    ("receive_count", "bus_id", "sns_id", "run"),
    [
        (1, "bus-b", "sns-1", 3),  # SNS delivered the finished run's publish twice: a copy
        (4, "bus-a", "sns-1", 3),  # the finished run's message come back: a redelivery
        (1, "bus-c", "sns-2", 4),  # the Lambda's next publish
        (2, "bus-c", "sns-2", 4),  # ... first received by an agent that died
    ],
)
def test_an_enveloped_message_is_told_by_its_sns_message_id(
    receive_count: int, bus_id: str, sns_id: str, run: int
) -> None:
    record = _record(TaskState.SUCCEEDED, "sns-1")
    assert _numbered(record.task, record, _delivery(receive_count, bus_id=bus_id, sns_id=sns_id)).run == run


@pytest.mark.parametrize(
    ("receive_count", "bus_id", "run"), [(2, "bus-a", 3), (2, "bus-b", 4), (1, "bus-b", 4)]
)
def test_a_raw_message_is_told_by_the_bus_message_id(receive_count: int, bus_id: str, run: int) -> None:
    record = _record(TaskState.FAILED, "bus-a")
    assert _numbered(record.task, record, _delivery(receive_count, bus_id=bus_id, sns_id=None)).run == run


@pytest.mark.parametrize(("receive_count", "run"), [(1, 4), (2, 3)])
def test_a_record_that_names_no_publish_goes_by_the_receive_count(receive_count: int, run: int) -> None:
    record = _record(TaskState.SUCCEEDED, None)
    assert _numbered(record.task, record, _delivery(receive_count, bus_id="x", sns_id="y")).run == run


@pytest.mark.parametrize("state", [TaskState.QUEUED, TaskState.RUNNING])
def test_a_task_still_going_keeps_its_run(state: TaskState) -> None:
    record = _record(state, "sns-1")
    assert _numbered(record.task, record, _delivery(1, bus_id="b", sns_id="sns-9")).run == 3
