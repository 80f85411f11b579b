"""Plumbing shared by the AWS backends (SNS+SQS bus, DynamoDB store, S3 storage).

- one boto3 session per backend, clients built lazily (building one costs ~0.1 s) and reused:
  boto3 clients are thread-safe, sessions are not, hence the lock;
- blocking boto3 calls run in the backend's own thread pool, so a 20 s SQS long poll never
  starves the event loop's default executor;
- ``map_errors()`` turns botocore exceptions into ``sdfleet.errors`` at the boundary.

Endpoint and credentials come from the standard AWS chain (``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_<SERVICE>``, ``AWS_PROFILE``, IRSA web identity, instance role, ...).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from botocore.parsers import ResponseParserError

from sdfleet.errors import ConfigError, NotFound, SdfleetError, ValidationFailed

T = TypeVar("T")

NOT_FOUND_CODES = frozenset(
    {
        "NotFound",  # SNS topic
        "NotFoundException",
        "AWS.SimpleQueueService.NonExistentQueue",
        "QueueDoesNotExist",
        "ResourceNotFoundException",  # DynamoDB table
        "NoSuchKey",
        "NoSuchBucket",
        "404",
    }
)
UNAVAILABLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "ProvisionedThroughputExceededException",
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "KMSThrottling",
    }
)
INVALID_CODES = frozenset(
    {"InvalidParameter", "InvalidParameterValue", "ValidationException", "InvalidMessageContents"}
)
ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "AuthorizationError",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "ExpiredToken",
    }
)


def error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def transient(e: Exception) -> bool:
    """Throttling, a 5xx, an unreachable or garbled endpoint: worth another try later."""
    if isinstance(e, ClientError):
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return error_code(e) in UNAVAILABLE_CODES or status >= 500
    return isinstance(e, BotoConnectionError | HTTPClientError | ResponseParserError)


def _from_client_error(
    e: ClientError, unavailable: type[SdfleetError], other: type[SdfleetError]
) -> Exception:
    code = error_code(e)
    message = f"{e.operation_name}: {code}: {e.response.get('Error', {}).get('Message', '')}"
    if code in NOT_FOUND_CODES:
        return NotFound(message)
    if transient(e):
        return unavailable(message)
    if code in INVALID_CODES:
        return ValidationFailed(message)
    if code in ACCESS_CODES:
        return ConfigError(f"AWS refused the credentials or IAM permissions: {message}")
    return other(message)


@contextmanager
def map_errors(unavailable: type[SdfleetError], other: type[SdfleetError]) -> Iterator[None]:
    """Translate botocore errors: not found → ``NotFound``; throttling, 5xx and connection
    failures → ``unavailable``; bad parameters → ``ValidationFailed``; credentials, region and
    IAM → ``ConfigError``; anything else → ``other``."""
    try:
        yield
    except ClientError as e:
        raise _from_client_error(e, unavailable, other) from e
    except (NoCredentialsError, PartialCredentialsError, NoRegionError) as e:
        raise ConfigError(f"AWS configuration: {e}") from e
    except (BotoConnectionError, HTTPClientError) as e:
        raise unavailable(f"AWS endpoint unreachable: {e}") from e
    except ResponseParserError as e:  # e.g. an HTML 500 page from a proxy or an emulator
        raise unavailable(f"AWS endpoint sent an unreadable answer: {e}") from e
    except BotoCoreError as e:
        raise other(f"AWS: {e}") from e


def parse_aws_url(url: str, scheme: str) -> tuple[str, str, dict[str, str]]:
    """``scheme://host/path?k=v`` → (host, path without leading slash, last value per query key)."""
    parts = urlsplit(url)
    if parts.scheme != scheme:
        raise ConfigError(f"expected a {scheme}:// URL, got {url!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    return parts.netloc, parts.path.lstrip("/"), query


def flag(query: Mapping[str, str], key: str, default: bool) -> bool:
    value = query.get(key)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{key}={value!r}: expected true or false")


def int_param(query: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(query.get(key, default))
    except ValueError as e:
        raise ConfigError(f"{key}={query[key]!r}: expected an integer") from e


class AwsContext:
    """A boto3 session, its lazily built clients and the thread pool that calls them."""

    def __init__(
        self,
        region: str | None = None,
        *,
        max_workers: int = 16,
        max_attempts: int = 3,
        read_timeout_s: float = 30.0,
    ) -> None:
        self._session = boto3.session.Session(region_name=region or None)
        # read timeout above SQS's longest poll (20 s); "standard" retries back off on throttling
        self._config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=5,
            read_timeout=read_timeout_s,
            max_pool_connections=max_workers,
        )
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sdfleet-aws")

    def client(self, service: str) -> Any:
        """The client for ``service``; call from a pool thread (building one is blocking)."""
        with self._lock:
            if service not in self._clients:
                self._clients[service] = self._session.client(service, config=self._config)  # type: ignore[call-overload]
            return self._clients[service]

    async def run(self, fn: Callable[[], T]) -> T:
        """Run the blocking ``fn`` in the pool."""
        return await asyncio.wrap_future(self._pool.submit(fn))

    def submit(self, fn: Callable[[], T]) -> Any:
        """Like ``run`` but returns the ``concurrent.futures.Future`` (to act on late results)."""
        return self._pool.submit(fn)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for c in clients:
            c.close()
