"""Plumbing shared by the Redis backends (Streams bus, task store).

URL form, for both: ``redis://[[user]:password@]host[:port][/db][?prefix=sdfleet&...]`` or
``rediss://`` for TLS (``ssl_cert_reqs``, ``ssl_ca_certs``... as redis-py reads them). ``prefix``
(default ``sdfleet``) namespaces every key; all other query options go to redis-py unchanged
(``socket_timeout``, ``socket_connect_timeout``, ``max_connections``, ``health_check_interval``...),
except ``password_secret=<ARN or name>``: the password is read from AWS Secrets Manager with the
process's AWS credentials (``_redis_secret``), for ElastiCache's AUTH token.

One connection pool per backend object. A server that goes away turns each call into the backend's
``*Unavailable`` error (fast: a short connect timeout and two quick retries); the pool drops dead
connections and reconnects on the next call, so a restarted server needs no process restart.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)
from redis.maint_notifications import MaintNotificationsConfig

from sdfleet.errors import ConfigError, SdfleetError

DEFAULT_PREFIX = "sdfleet"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._:-]+$")

# Script shebangs (Redis ≥ 7). At its maxmemory with ``noeviction`` (the only policy under which a
# queue keeps its messages) Redis refuses writes, but a script without flags is refused only at a
# write that grows memory, and not at all once it has written anything (a ZREM first let the task
# store's create run on past the limit). ``ADDS_WORK`` scripts (a publish, a rate take before it)
# are refused whole at the limit: the API answers 503 and clients back off. ``MOVES_WORK`` scripts
# (receive, records, ack, release, lease, stats) run on, so agents drain the queues that filled it
# and free what the messages hold; a task's record may still be written (the API's after its
# publish was taken, an agent's for a task another producer published).
ADDS_WORK = "#!lua\n"
MOVES_WORK = "#!lua flags=allow-oom\n"

# A dead server should surface as an error within about a second, not after redis-py's default
# backoff (seconds): callers such as the agent loop have their own retry schedule.
_CONNECT_TIMEOUT_S = 2.0
_SOCKET_TIMEOUT_S = 10.0


def split_url(url: str) -> tuple[str, str]:
    """``redis://h:p/0?prefix=x&socket_timeout=3`` → (``redis://h:p/0?socket_timeout=3``, ``x``)."""
    clean, prefix, _ = _parse(url)
    return clean, prefix


def connect(url: str) -> tuple[aioredis.Redis, str]:
    """A client on its own connection pool for ``url``, and the key prefix the URL names."""
    clean, prefix, secret = _parse(url)
    extra: dict[str, Any] = {}
    if secret is not None:
        from sdfleet._redis_secret import SecretsManagerPassword

        parts = urlsplit(clean)
        username = unquote(parts.username) if parts.username else None
        extra["credential_provider"] = SecretsManagerPassword(secret, username=username)
        # the user name travels in the provider's answer (redis-py takes one or the other)
        clean = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
    try:
        pool = aioredis.ConnectionPool.from_url(
            clean,
            socket_connect_timeout=_CONNECT_TIMEOUT_S,
            socket_timeout=_SOCKET_TIMEOUT_S,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=2),
            # A new connection's handshake is not retried by redis-py (only commands are): keep it
            # to HELLO, without the informational CLIENT SETINFO pair and the CLIENT
            # MAINT_NOTIFICATIONS of Redis Enterprise, three round trips a dropped reply can fail.
            driver_info=None,
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
            **extra,
        )
    except ValueError as e:
        raise ConfigError(f"bad redis URL {url!r}: {e}") from e
    # from_pool: the client owns the pool, so aclose() closes its connections too (a client made
    # with connection_pool= leaves them open).
    return aioredis.Redis.from_pool(pool), prefix


def _parse(url: str) -> tuple[str, str, str | None]:
    """(the URL redis-py gets, the key prefix, the ``password_secret`` if any), from one parse."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"not a redis URL (want redis://host:port/db or rediss://...): {url!r}")
    prefix, secret = DEFAULT_PREFIX, None
    rest: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "prefix":
            prefix = value
        elif key == "password_secret":
            secret = value
        else:
            rest.append((key, value))
    if not _PREFIX_RE.match(prefix):
        raise ConfigError(f"bad redis key prefix {prefix!r}: letters, digits and . _ : - only")
    if secret is not None and parts.password:
        raise ConfigError("a redis URL has a password or a password_secret, not both")
    return urlunsplit(parts._replace(query=urlencode(rest))), prefix, secret


def text(value: object) -> str:
    """A reply's value as ``str`` (the clients here do not decode replies: bodies are bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def describe(client: aioredis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis at {kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


@contextmanager
def map_errors(where: str, unavailable: type[SdfleetError], other: type[SdfleetError]) -> Iterator[None]:
    """Translate redis-py errors: unreachable, loading, read-only, full → ``unavailable``; rest →
    ``other``."""
    try:
        yield
    except AuthenticationError as e:
        raise ConfigError(f"{where}: authentication failed: {e}") from e
    except OutOfMemoryError as e:
        raise unavailable(
            f"{where} is full: Redis refuses new work at its maxmemory until agents drain the "
            f"queues ({e}); retry later",
            code=unavailable.code.replace("_unavailable", "_full"),  # bus_full, store_full
        ) from e
    except (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ReadOnlyError, OSError) as e:
        raise unavailable(f"{where} is unavailable ({type(e).__name__}: {e}); retry later") from e
    except RedisError as e:
        raise other(f"{where}: {type(e).__name__}: {e}") from e
