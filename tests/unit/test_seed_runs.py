"""Which run of a finished id a seed message is: the seed's messages do not number their runs, so
the drop-in agent tells the Lambda's next publish from the finished run's own message by the
publish (``TaskRecord.message_id``), and only records that do not name one by the receive count."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import cast

import pytest

from sdfleet.agent.defer import AnotherPublishRuns, other_publish
from sdfleet.agent.parts import Parts
from sdfleet.agent.prepare import _numbered
from sdfleet.bus.base import Delivery
from sdfleet.errors import TransitionConflict
from sdfleet.messages import decode_delivery
from sdfleet.tasks import Task, TaskRecord, TaskState
from seed_payloads import V1ALPHA2_T2I, sns_envelope

MESSAGE = json.dumps(V1ALPHA2_T2I["task"])


def _delivery(receive_count: int, *, bus_id: str, sns_id: str | None) -> Delivery:
    body = MESSAGE.encode() if sns_id is None else sns_envelope(MESSAGE, {}, message_id=sns_id)
    return Delivery("dynamic", bus_id, body, {}, receive_count, "r", 0.0)


def _numbered_by_publish(record: TaskRecord, d: Delivery) -> int:
    return _numbered(record.task, record, d, decode_delivery(d).publish).run


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
    assert _numbered_by_publish(record, _delivery(receive_count, bus_id=bus_id, sns_id=sns_id)) == run


@pytest.mark.parametrize(
    ("receive_count", "bus_id", "run"), [(2, "bus-a", 3), (2, "bus-b", 4), (1, "bus-b", 4)]
)
def test_a_raw_message_is_told_by_the_bus_message_id(receive_count: int, bus_id: str, run: int) -> None:
    record = _record(TaskState.FAILED, "bus-a")
    assert _numbered_by_publish(record, _delivery(receive_count, bus_id=bus_id, sns_id=None)) == run


@pytest.mark.parametrize(("receive_count", "run"), [(1, 4), (2, 3)])
def test_a_record_that_names_no_publish_goes_by_the_receive_count(receive_count: int, run: int) -> None:
    record = _record(TaskState.SUCCEEDED, None)
    assert _numbered_by_publish(record, _delivery(receive_count, bus_id="x", sns_id="y")) == run


@pytest.mark.parametrize("state", [TaskState.QUEUED, TaskState.RUNNING])
def test_a_task_still_going_keeps_its_run(state: TaskState) -> None:
    record = _record(state, "sns-1")
    assert _numbered_by_publish(record, _delivery(1, bus_id="b", sns_id="sns-9")) == 3


def _held_by(state: TaskState, message_id: str | None, queue: str | None = "dynamic") -> TaskRecord:
    return TaskRecord(task=Task(id="seed-1", run=3, queue=queue), state=state, message_id=message_id)


@pytest.mark.parametrize(
    ("record", "sns_id", "waits"),
    [
        (_held_by(TaskState.RUNNING, "sns-1"), "sns-2", True),  # the Lambda's next POST: after this run
        (_held_by(TaskState.QUEUED, "sns-1"), "sns-2", True),  # ... reopened for another publish
        (_held_by(TaskState.SUCCEEDED, "sns-1"), "sns-2", True),  # ended since (begin's late read)
        (_held_by(TaskState.RUNNING, "sns-1"), "sns-1", False),  # its own run: a copy, a redelivery
        (_held_by(TaskState.RUNNING, None), "sns-2", False),  # a record that names no publish
        (_held_by(TaskState.RUNNING, "sns-1", queue=None), "sns-2", True),
        (_held_by(TaskState.RUNNING, "sns-1", queue="sd15"), "sns-2", False),  # a copy on another queue
    ],
)
def test_a_seed_message_waits_only_for_another_publishes_run_on_its_queue(
    record: TaskRecord, sns_id: str, waits: bool
) -> None:
    d = _delivery(1, bus_id="b", sns_id=sns_id)
    assert (other_publish(record, d, decode_delivery(d).publish) is not None) is waits


def test_a_seed_start_that_finds_another_publishes_run_waits_and_ours_do_not() -> None:
    """Two agents both found no record for two publishes of a new id; the one whose create lost
    finds the other's run at its start: it waits (``AnotherPublishRuns``), it does not take over,
    even on a redelivery, and it is not told it is the same run."""
    from sdfleet.agent.begin import _start

    record = _held_by(TaskState.RUNNING, "sns-1")
    for receive_count in (1, 3):
        d = _delivery(receive_count, bus_id="b", sns_id="sns-2")
        with pytest.raises(AnotherPublishRuns, match="another publish is running"):
            _start(record.model_copy(deep=True), cast(Parts, None), d, "sns-2", numbered=False)
    # sdfleet's own messages number their runs: the receive-count rule, as before
    parts = cast(Parts, SimpleNamespace(worker_id="me"))
    with pytest.raises(TransitionConflict, match="already running") as e:
        d = _delivery(1, bus_id="b", sns_id="sns-2")
        _start(record.model_copy(deep=True), parts, d, "sns-2", numbered=True)
    assert not isinstance(e.value, AnotherPublishRuns)


def test_a_reopened_record_keeps_the_publishes_of_the_last_earlier_runs() -> None:
    from sdfleet.store.base import reopened
    from sdfleet.tasks import EARLIER_PUBLISHES

    last = EARLIER_PUBLISHES + 3
    record = TaskRecord(task=Task(id="seed-1", run=1), state=TaskState.SUCCEEDED, message_id="sns-1")
    for run in range(2, last + 1):
        record = reopened(record, Task(id="seed-1", run=run), message_id=f"sns-{run}")
        assert record.message_id == f"sns-{run}"
        record.state = TaskState.SUCCEEDED
    assert record.earlier_publishes == [f"sns-{n}" for n in range(last - EARLIER_PUBLISHES, last)]
    # the API reopens a run without naming its publish: nothing to keep for that run
    api = reopened(record, Task(id="seed-1", run=last + 1))
    api.state = TaskState.FAILED
    after = reopened(api, Task(id="seed-1", run=last + 2), message_id="sns-x")
    assert after.earlier_publishes == [*record.earlier_publishes[1:], f"sns-{last}"]
