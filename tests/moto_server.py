"""``moto_server`` with DynamoDB's conditional writes and SQS's receives made atomic, as AWS's are.

moto checks a write's condition and then applies it with no lock between (moto 5.2.5,
``dynamodb/models/table.py``), and its server answers each request on a thread of its own: under
load, two conditional puts at one version can both win. Measured here (10 writers at once on one
key, three busy processes beside): two winners in 2 of 600 rounds, in 0 of 600 with this lock;
``test_concurrent_transitions_apply_once_each[dynamodb]`` had failed once in seven full runs the
same way. The task store relies on DynamoDB's documented atomicity, which this restores by holding one
lock across each DynamoDB write.

Its SQS receive is the same kind of race: it reads a message's visibility, then marks it received,
with no lock between, so two receives at once can both take one message within its visibility
timeout. Measured here (four receivers at once on ten messages, three busy processes beside): eight
messages taken twice in 450 rounds, none in 450 with the lock;
``test_concurrent_receivers_never_share[aws]`` had failed once in a full run the same way. SQS
may deliver a message twice on rare occasions, and the agent copes (the contract's at-least-once
tests), but not as a matter of course under load; so one lock is held across each receive's scan
and let go while a long poll waits. Every other call is moto's own. Arguments are ``moto_server``'s.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from moto.dynamodb.models import DynamoDBBackend
from moto.server import main
from moto.sqs.models import Queue, SQSBackend

WRITES = (
    "put_item",
    "update_item",
    "delete_item",
    "transact_write_items",
    "execute_statement",
    "execute_transaction",
    "batch_execute_statement",
)
_lock = threading.RLock()


def _atomic(write: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(write)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _lock:
            return write(*args, **kwargs)

    return locked


for name in WRITES:
    setattr(DynamoDBBackend, name, _atomic(getattr(DynamoDBBackend, name)))

_receiving = threading.Lock()
_receive = SQSBackend.receive_message
_wait = Queue.wait_for_messages


def _receive_atomically(self: SQSBackend, *args: Any, **kwargs: Any) -> Any:
    with _receiving:
        return _receive(self, *args, **kwargs)


def _wait_unlocked(self: Queue, timeout: int) -> None:
    # Called only from within a receive (moto 5.2.5): its long poll waits without the lock.
    _receiving.release()
    try:
        _wait(self, timeout)
    finally:
        _receiving.acquire()


SQSBackend.receive_message = _receive_atomically  # type: ignore[method-assign]
Queue.wait_for_messages = _wait_unlocked  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
