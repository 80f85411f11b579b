"""``moto_server`` with DynamoDB's conditional writes made atomic, as DynamoDB's are.

moto checks a write's condition and then applies it with no lock between (moto 5.2.5,
``dynamodb/models/table.py``), and its server answers each request on a thread of its own: under
load, two conditional puts at one version can both win. Measured here (10 writers at once on one
key, three busy processes beside): two winners in 2 of 600 rounds, in 0 of 600 with this lock;
``test_concurrent_transitions_apply_once_each[dynamodb]`` had failed once in seven full runs the
same way. The task store relies on DynamoDB's documented atomicity, which this restores by holding one
lock across each DynamoDB write; every other call is moto's own. Arguments are ``moto_server``'s.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from moto.dynamodb.models import DynamoDBBackend
from moto.server import main

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

if __name__ == "__main__":
    main()
