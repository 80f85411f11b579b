"""The task store on DynamoDB (the ``aws://`` store URL).

URL: ``aws://[?table=sdfleet-tasks][&prefix=sdfleet-][&region=us-east-1][&create=true][&retries=3]``

- ``table``: the table name; default ``<prefix>tasks``, so one ``aws://?prefix=sdfleet-`` URL can
  serve as bus and store URL alike (default prefix ``sdfleet-``);
- ``create`` (default true): create the table (on-demand billing) on first use if it is missing;
  set false where the table comes from CDK and the role may not ``dynamodb:CreateTable``;
- ``retries``: attempts per call (botocore "standard" mode), default 3;
- endpoint, credentials and region otherwise come from the standard AWS chain.

Table: partition key ``id``, whose value is ``<tenant>/<task id>`` (ids are per tenant; neither a
tenant name nor a task id holds a ``/``; records of earlier versions, keyed by the bare task id,
are not read); attributes ``tenant``, ``sk`` (``<created_at, zero-padded>#<id>``,
so newest-first is a descending string order with the id breaking ties), ``state``, ``version``,
``doc`` (the record's JSON) and ``put_id`` (a token of the put that wrote it); GSI ``by-tenant``
(``tenant``, ``sk``), all attributes projected.
Records of queued and running tasks also carry ``active`` (= the tenant): the sparse GSI
``by-tenant-active`` (``active``, ``sk``, keys only) holds just those, so a tenant's tasks in flight
are counted without reading its history. A table created before that index existed gets it added
on first use (``create=true``).
With ``retain_s`` a finished record's item carries ``expires_at`` (epoch s), the table's TTL
attribute: DynamoDB deletes it some time after (within days); reads treat it as gone from that
second, and its id as free. ``create=true`` turns TTL on for a table that has it off (the access
store's spent claims carry ``expires_at`` too).
Reads of one record are strongly consistent; ``list`` reads the GSI (eventually consistent on AWS).
The access store (``access_dynamodb``) keeps its few items in the same table, under ids that start
with ``!`` (never a tenant's).
"""

from __future__ import annotations

import base64
import binascii
import builtins
import logging
import math
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sdfleet._aws import AwsContext, error_code, flag, int_param, map_errors, parse_aws_url
from sdfleet.errors import StoreError, StoreUnavailable, ValidationFailed
from sdfleet.store.base import expires_at, read_record
from sdfleet.tasks import TaskRecord, TaskState

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

log = logging.getLogger(__name__)

TTL_ATTRIBUTE = "expires_at"
PUT_ID = "put_id"
GSI = "by-tenant"
ACTIVE_GSI = "by-tenant-active"
INDEXES = (GSI, ACTIVE_GSI)
MAX_PAGE = 1000
_ACTIVE_STATES = (TaskState.QUEUED, TaskState.RUNNING)
Item = dict[str, dict[str, Any]]
"""An item as the low-level client writes it: attribute name → {type: value}."""


def sort_key(record: TaskRecord) -> str:
    return f"{record.task.created_at:020.6f}#{record.id}"


def encode_cursor(sk: str) -> str:
    return base64.urlsafe_b64encode(sk.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """Cursor → (sort key, task id)."""
    try:
        sk = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        raise ValidationFailed(f"bad cursor {cursor!r}") from e
    _, sep, task_id = sk.partition("#")
    if not sep or not task_id:
        raise ValidationFailed(f"bad cursor {cursor!r}")
    return sk, task_id


def record_key(tenant: str, task_id: str) -> str:
    """The partition key value of a tenant's task."""
    return f"{tenant}/{task_id}"


def _item(record: TaskRecord, retain_s: float | None) -> dict[str, Any]:
    item = {
        "id": {"S": record_key(record.tenant, record.id)},
        "tenant": {"S": record.tenant},
        "sk": {"S": sort_key(record)},
        "state": {"S": record.state.value},
        "version": {"N": str(record.version)},
        "doc": {"S": record.model_dump_json()},
    }
    if record.state in _ACTIVE_STATES:
        item["active"] = {"S": record.tenant}
    item.update(put_id())
    expires = expires_at(record, retain_s)
    if expires is not None:
        item[TTL_ATTRIBUTE] = {"N": str(math.ceil(expires))}
    return item


def put_id() -> Item:
    """The attribute that names one put: every conditional put carries a fresh one (``own_write``)."""
    return {PUT_ID: {"S": uuid.uuid4().hex}}


def own_write(e: ClientError, item: Item) -> bool:
    """Whether the ``ConditionalCheckFailedException`` ``e`` of a ``PutItem`` of ``item`` sent with
    ``ReturnValuesOnConditionCheckFailure="ALL_OLD"`` found that very put in place.

    botocore sends a request again when its connection drops, and a put that had landed before its
    reply was lost then fails its own condition. Taken for a lost race, the change would be made
    twice (``transition`` reads and mutates again). The put's ``put_id`` tells it from another
    writer's put of equal content.
    """
    old = e.response.get("Item")
    return isinstance(old, dict) and PUT_ID in item and old.get(PUT_ID) == item[PUT_ID]


def conditional_put(db: DynamoDBClient, table: str, item: Item, **condition: Any) -> bool:
    """``PutItem`` of ``item`` under ``condition`` (blocking): False when the condition failed on
    another writer's item, True when the put landed, on its first try or before a retry."""
    try:
        db.put_item(TableName=table, Item=item, ReturnValuesOnConditionCheckFailure="ALL_OLD", **condition)
    except ClientError as e:
        if error_code(e) == "ConditionalCheckFailedException":
            return own_write(e, item)
        raise
    return True


def _at_version(expected_version: int) -> dict[str, Any]:
    """A write's condition: the item is at ``expected_version`` and not expired."""
    return {
        "ConditionExpression": f"version = :expected AND {_LIVE}",
        "ExpressionAttributeValues": {
            ":expected": {"N": str(expected_version)},
            ":now": {"N": str(time.time())},
        },
    }


def _live(item: dict[str, Any], now: float) -> bool:
    """Not expired: TTL deletes an item up to days after its ``expires_at``."""
    expires = item.get(TTL_ATTRIBUTE)
    return expires is None or float(expires["N"]) > now


# A condition or filter that passes only items not expired at ``:now``.
_LIVE = f"(attribute_not_exists({TTL_ATTRIBUTE}) OR {TTL_ATTRIBUTE} > :now)"


def _record(item: dict[str, Any]) -> TaskRecord:
    return read_record(item["doc"]["S"])


def table_spec(table: str) -> dict[str, Any]:
    """``CreateTable`` arguments of the task table (boto3 names): what ``create=true`` makes, and
    what the CDK app (deploy/cdk) declares, so the two cannot drift."""
    return {
        "TableName": table,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [
            {"AttributeName": "id", "AttributeType": "S"},
            {"AttributeName": "tenant", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
            {"AttributeName": "active", "AttributeType": "S"},
        ],
        "KeySchema": [{"AttributeName": "id", "KeyType": "HASH"}],
        "GlobalSecondaryIndexes": [
            {
                "IndexName": GSI,
                "KeySchema": [
                    {"AttributeName": "tenant", "KeyType": "HASH"},
                    {"AttributeName": "sk", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            },
            _active_index(),
        ],
    }


def _active_index() -> dict[str, Any]:
    return {
        "IndexName": ACTIVE_GSI,
        "KeySchema": [
            {"AttributeName": "active", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        "Projection": {"ProjectionType": "KEYS_ONLY"},
    }


class DynamoTaskStore:
    """``TaskStore`` on one DynamoDB table. Build with ``DynamoTaskStore.from_url("aws://?table=…")``."""

    def __init__(
        self,
        table: str = "sdfleet-tasks",
        *,
        region: str | None = None,
        create: bool = True,
        max_attempts: int = 3,
        retain_s: float | None = None,
    ) -> None:
        self.table = table
        self.create_table = create
        self.retain_s = retain_s
        self._aws = AwsContext(region, max_attempts=max_attempts)
        self._ready = False
        self._ready_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, retain_s: float | None = None) -> DynamoTaskStore:
        _, _, q = parse_aws_url(url, "aws")
        table = q.get("table") or f"{q.get('prefix', 'sdfleet-')}tasks"
        return cls(
            table,
            region=q.get("region"),
            create=flag(q, "create", True),
            max_attempts=int_param(q, "retries", 3),
            retain_s=retain_s,
        )

    @property
    def _db(self) -> DynamoDBClient:
        client: DynamoDBClient = self._aws.client("dynamodb")
        return client

    def _ensure_table(self) -> None:
        with self._ready_lock:
            if self._ready:
                return
            try:
                described = self._db.describe_table(TableName=self.table)["Table"]
                self._add_active_index(described)
            except ClientError as e:
                if error_code(e) != "ResourceNotFoundException" or not self.create_table:
                    raise
                try:
                    self._db.create_table(**table_spec(self.table))
                except ClientError as e2:  # another process won the race
                    if error_code(e2) != "ResourceInUseException":
                        raise
                waiter = self._db.get_waiter("table_exists")
                waiter.wait(TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 120})
            self._enable_ttl()
            self._ready = True

    def _enable_ttl(self) -> None:
        """Turn the table's TTL on, so DynamoDB deletes what carries ``expires_at``: expired records
        (``retain_s``) and the API's spent submit claims (the CDK app's table has it on already; a
        role without ``UpdateTimeToLive`` leaves them, unread)."""
        if not self.create_table:
            return
        try:
            ttl = self._db.describe_time_to_live(TableName=self.table)["TimeToLiveDescription"]
            if ttl.get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
                return
            self._db.update_time_to_live(
                TableName=self.table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
            )
        except ClientError as e:
            log.warning(
                "could not turn on TTL (%s) of table %s: expired records are not read, but stay "
                "in the table: %s",
                TTL_ATTRIBUTE,
                self.table,
                e,
            )

    def _add_active_index(self, described: Any) -> None:
        """Tables of earlier versions lack ``by-tenant-active``: add it (it fills in the background)."""
        names = {g["IndexName"] for g in described.get("GlobalSecondaryIndexes", [])}
        if ACTIVE_GSI in names or not self.create_table:
            return
        try:
            self._db.update_table(
                TableName=self.table,
                AttributeDefinitions=[
                    {"AttributeName": "active", "AttributeType": "S"},
                    {"AttributeName": "sk", "AttributeType": "S"},
                ],
                GlobalSecondaryIndexUpdates=[{"Create": _active_index()}],  # type: ignore[typeddict-item]
            )
        except ClientError as e:  # no UpdateTable right: only max_in_flight needs the index
            log.warning("could not add index %s to table %s: %s", ACTIVE_GSI, self.table, e)

    async def run(self, fn: Any) -> Any:
        """``fn()`` on the AWS thread once the table exists, its errors mapped to the store's."""
        return await self._run(fn)

    @property
    def db(self) -> DynamoDBClient:
        return self._db

    async def _run(self, fn: Any) -> Any:
        def call() -> Any:
            self._ensure_table()
            return fn()

        with map_errors(StoreUnavailable, StoreError):
            return await self._aws.run(call)

    async def create(self, record: TaskRecord) -> tuple[TaskRecord, bool]:
        """Conditional ``PutItem`` (no item, or an expired one); returns the existing record of the
        tenant's id if any."""
        item = _item(record, self.retain_s)

        def put() -> dict[str, Any] | None:
            try:
                self._db.put_item(
                    TableName=self.table,
                    Item=item,
                    ConditionExpression=f"attribute_not_exists(id) OR NOT {_LIVE}",
                    ExpressionAttributeValues={":now": {"N": str(time.time())}},
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
            except ClientError as e:
                if error_code(e) != "ConditionalCheckFailedException":
                    raise
                if own_write(e, item):
                    return None
                old: dict[str, Any] | None = e.response.get("Item")  # type: ignore[assignment]
                if old is None:
                    old = self._db.get_item(
                        TableName=self.table, Key={"id": item["id"]}, ConsistentRead=True
                    )["Item"]
                return old
            return None

        existing = await self._run(put)
        if existing is None:
            return record, True  # what is stored is its JSON: the caller's object is theirs
        return _record(existing), False

    async def get(self, tenant: str, task_id: str) -> TaskRecord | None:
        """Strongly consistent ``GetItem``."""
        key = {"id": {"S": record_key(tenant, task_id)}}

        def get() -> dict[str, Any] | None:
            found = self._db.get_item(TableName=self.table, Key=key, ConsistentRead=True)
            return found.get("Item")

        item = await self._run(get)
        return None if item is None or not _live(item, time.time()) else _record(item)

    async def compare_and_set(self, record: TaskRecord, expected_version: int) -> bool:
        """``PutItem`` with ``ConditionExpression`` ``version = :expected``."""
        if record.version != expected_version + 1:
            raise ValueError(f"record.version must be {expected_version + 1}, got {record.version}")
        item, condition = _item(record, self.retain_s), _at_version(expected_version)
        ok: bool = await self._run(lambda: conditional_put(self._db, self.table, item, **condition))
        return ok

    async def delete(self, tenant: str, task_id: str, expected_version: int) -> bool:
        """``DeleteItem`` with ``ConditionExpression`` ``version = :expected`` (and not expired)."""
        key, condition = {"id": {"S": record_key(tenant, task_id)}}, _at_version(expected_version)

        def call() -> bool:
            try:
                self._db.delete_item(TableName=self.table, Key=key, **condition)
            except ClientError as e:
                if error_code(e) == "ConditionalCheckFailedException":
                    return False
                raise
            return True

        ok: bool = await self._run(call)
        return ok

    async def list(
        self,
        tenant: str,
        *,
        state: TaskState | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[builtins.list[TaskRecord], str | None]:
        """``Query`` on the ``by-tenant`` GSI, newest first; ``state`` and expiry are a filter
        expression, so pages are filled by as many queries as it takes."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValidationFailed(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        query: dict[str, Any] = {
            "TableName": self.table,
            "IndexName": GSI,
            "KeyConditionExpression": "tenant = :t",
            "FilterExpression": _LIVE,
            "ExpressionAttributeValues": {":t": {"S": tenant}, ":now": {"N": str(time.time())}},
            "ScanIndexForward": False,
        }
        if state is not None:
            query["FilterExpression"] = f"#s = :s AND {_LIVE}"
            query["ExpressionAttributeNames"] = {"#s": "state"}
            query["ExpressionAttributeValues"][":s"] = {"S": state.value}
        if cursor is not None:
            sk, task_id = decode_cursor(cursor)
            start = {"id": {"S": record_key(tenant, task_id)}, "tenant": {"S": tenant}, "sk": {"S": sk}}
            query["ExclusiveStartKey"] = start
        items: list[dict[str, Any]] = await self._run(lambda: self._query(query, limit + 1))
        page = items[:limit]
        next_cursor = encode_cursor(page[-1]["sk"]["S"]) if len(items) > limit else None
        return [_record(i) for i in page], next_cursor

    def _query(self, query: dict[str, Any], want: int) -> builtins.list[dict[str, Any]]:
        items: builtins.list[dict[str, Any]] = []
        while len(items) < want:
            resp = self._db.query(**query, Limit=want - len(items))
            items.extend(resp.get("Items", []))
            last = resp.get("LastEvaluatedKey")
            if not last:
                break
            query["ExclusiveStartKey"] = last
        return items[:want]

    async def aclose(self) -> None:
        self._aws.close()

    async def __aenter__(self) -> DynamoTaskStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
