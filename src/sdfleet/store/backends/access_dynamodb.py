"""The access store in the DynamoDB task table (the ``aws://`` store URL), under ids no task has
(they start with ``!``; a task's id is ``<tenant>/<task id>`` and a tenant starts with a letter or
digit):

- ``!key/<digest>``: a stored key (``doc`` its JSON, ``kid`` its id), with ``tenant = "!keys"`` and
  an ``sk`` so that the ``by-tenant`` index lists the keys;
- ``!rate/<bucket>``: a GCRA bucket's theoretical arrival time ``tat``, written only if nobody
  changed it since it was read (conditional ``PutItem``), retried on a lost race;
- ``!claim/<name>``: a lock with its expiry ``expires``; a released one is overwritten as expired,
  and ``expires_at`` (the table's one TTL attribute, which task records use too) lets DynamoDB
  delete it an hour after it expired: a claim is taken per submitted task, so without it the
  table would keep one item per task for ever.

Only ``GetItem``, ``PutItem`` and ``Query`` are used: what the CDK app grants the API role.
"""

from __future__ import annotations

import time
from typing import Any

from sdfleet.errors import StoreError
from sdfleet.store.access import ApiKey, gcra
from sdfleet.store.backends.dynamodb import (
    ACTIVE_GSI,
    GSI,
    TTL_ATTRIBUTE,
    DynamoTaskStore,
    conditional_put,
    put_id,
)

KEYS_TENANT = "!keys"
_TAKE_TRIES = 20


def _key_item(key: ApiKey) -> dict[str, Any]:
    return {
        "id": {"S": f"!key/{key.digest}"},
        "tenant": {"S": KEYS_TENANT},
        "sk": {"S": f"{key.created_at:020.6f}#{key.id}"},
        "kid": {"S": key.id},
        "doc": {"S": key.model_dump_json()},
    }


class DynamoAccessStore:
    """``AccessStore`` in the task table of a ``DynamoTaskStore`` built from the same URL."""

    def __init__(self, tasks: DynamoTaskStore) -> None:
        self.tasks = tasks

    @classmethod
    def from_url(cls, url: str) -> DynamoAccessStore:
        return cls(DynamoTaskStore.from_url(url))

    @property
    def table(self) -> str:
        return self.tasks.table

    async def add_key(self, key: ApiKey) -> None:
        item = _key_item(key)
        await self.tasks.run(lambda: self.tasks.db.put_item(TableName=self.table, Item=item))

    async def find_key(self, key_digest: str) -> ApiKey | None:
        item = await self._get(f"!key/{key_digest}")
        return None if item is None else ApiKey.model_validate_json(item["doc"]["S"])

    async def keys(self) -> list[ApiKey]:
        def query() -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = []
            args: dict[str, Any] = {
                "TableName": self.table,
                "IndexName": GSI,
                "KeyConditionExpression": "tenant = :t",
                "ExpressionAttributeValues": {":t": {"S": KEYS_TENANT}},
            }
            while True:
                resp = self.tasks.db.query(**args)
                items.extend(resp.get("Items", []))
                if not resp.get("LastEvaluatedKey"):
                    return items
                args["ExclusiveStartKey"] = resp["LastEvaluatedKey"]

        return [ApiKey.model_validate_json(i["doc"]["S"]) for i in await self.tasks.run(query)]

    async def revoke(self, key_id: str) -> ApiKey | None:
        key = next((k for k in await self.keys() if k.id == key_id), None)
        if key is None or key.revoked_at is not None:
            return key
        key.revoked_at = time.time()
        await self.add_key(key)
        return key

    async def take(self, bucket: str, rate: float, burst: int) -> float:
        for _ in range(_TAKE_TRIES):
            item = await self._get(f"!rate/{bucket}")
            old = item["tat"]["N"] if item else None
            new_tat, wait = gcra(float(old) if old else 0.0, time.time(), rate, burst)
            if new_tat is None:
                return wait
            if await self._put_if(f"!rate/{bucket}", {"tat": {"N": repr(new_tat)}}, "tat", old):
                return 0.0
        raise StoreError(f"rate bucket {bucket!r}: too many concurrent writers")

    async def count_active(self, tenant: str, at_most: int) -> int:
        def count() -> int:
            total = 0
            args: dict[str, Any] = {
                "TableName": self.table,
                "IndexName": ACTIVE_GSI,
                "KeyConditionExpression": "active = :t",
                "ExpressionAttributeValues": {":t": {"S": tenant}},
                "Select": "COUNT",
            }
            while total < at_most:
                resp = self.tasks.db.query(**args, Limit=at_most - total)
                total += int(resp.get("Count", 0))
                if not resp.get("LastEvaluatedKey"):
                    break
                args["ExclusiveStartKey"] = resp["LastEvaluatedKey"]
            return min(total, at_most)

        counted: int = await self.tasks.run(count)
        return counted

    async def claim(self, name: str, ttl_s: float) -> bool:
        now = time.time()
        values = {"expires": {"N": repr(now + ttl_s)}, TTL_ATTRIBUTE: {"N": str(int(now + ttl_s) + 3600)}}

        item = {"id": {"S": f"!claim/{name}"}, **values, **put_id()}
        condition = {
            "ConditionExpression": "attribute_not_exists(id) OR #e <= :now",
            "ExpressionAttributeNames": {"#e": "expires"},
            "ExpressionAttributeValues": {":now": {"N": repr(now)}},
        }
        won: bool = await self.tasks.run(
            lambda: conditional_put(self.tasks.db, self.table, item, **condition)
        )
        return won

    async def release(self, name: str) -> None:
        item = {
            "id": {"S": f"!claim/{name}"},
            "expires": {"N": "0"},
            TTL_ATTRIBUTE: {"N": str(int(time.time()))},
        }
        await self.tasks.run(lambda: self.tasks.db.put_item(TableName=self.table, Item=item))

    async def _get(self, item_id: str) -> dict[str, Any] | None:
        def get() -> dict[str, Any] | None:
            found = self.tasks.db.get_item(
                TableName=self.table, Key={"id": {"S": item_id}}, ConsistentRead=True
            )
            return found.get("Item")

        item: dict[str, Any] | None = await self.tasks.run(get)
        return item

    async def _put_if(self, item_id: str, values: dict[str, Any], field: str, old: str | None) -> bool:
        """Put the item iff ``field`` still holds ``old`` (None: the item does not exist)."""
        condition: dict[str, Any] = (
            {"ConditionExpression": "attribute_not_exists(id)"}
            if old is None
            else {
                "ConditionExpression": "#f = :old",
                "ExpressionAttributeNames": {"#f": field},
                "ExpressionAttributeValues": {":old": {"N": old}},
            }
        )

        item = {"id": {"S": item_id}, **values, **put_id()}
        ok: bool = await self.tasks.run(lambda: conditional_put(self.tasks.db, self.table, item, **condition))
        return ok

    async def aclose(self) -> None:
        await self.tasks.aclose()
