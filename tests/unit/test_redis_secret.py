"""``?password_secret=`` on Redis URLs: the password (ElastiCache's AUTH token) read from AWS Secrets
Manager, on moto_server, by clients of a real redis-server whose ACL user has that password."""

from __future__ import annotations

import json
import uuid
from typing import Any

import boto3
import pytest

from sdfleet._redis import connect, map_errors
from sdfleet._redis_secret import SecretsManagerPassword
from sdfleet.errors import BusError, BusUnavailable, ConfigError


def _user(server: Any, password: str) -> str:
    import redis

    name = f"sd{uuid.uuid4().hex[:8]}"
    with redis.Redis(host="127.0.0.1", port=server.port) as admin:
        admin.acl_setuser(name, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all"])
    return name


def _secret(value: str) -> str:
    sm = boto3.client("secretsmanager", region_name="us-east-1")
    return str(sm.create_secret(Name=f"sd-{uuid.uuid4().hex[:8]}", SecretString=value)["ARN"])


async def test_a_client_authenticates_with_the_secret(redis_server: Any, moto_url: str) -> None:
    user = _user(redis_server, "token-1")
    arn = _secret("token-1")
    client, prefix = connect(
        f"redis://{user}@127.0.0.1:{redis_server.port}/0?password_secret={arn}&prefix=p1"
    )
    try:
        assert prefix == "p1"
        assert await client.acl_whoami() == user
    finally:
        await client.aclose()


async def test_a_json_secret_and_a_wrong_one(redis_server: Any, moto_url: str) -> None:
    user = _user(redis_server, "token-2")
    good = _secret(json.dumps({"username": user, "password": "token-2"}))
    client, _ = connect(f"redis://127.0.0.1:{redis_server.port}/0?password_secret={good}")
    try:
        assert await client.acl_whoami() == user
    finally:
        await client.aclose()
    bad = _secret(json.dumps({"username": user, "password": "not-it"}))
    client, _ = connect(f"redis://127.0.0.1:{redis_server.port}/0?password_secret={bad}")
    try:
        with pytest.raises(ConfigError, match="authentication failed"):
            with map_errors("redis", BusUnavailable, BusError):
                await client.ping()
    finally:
        await client.aclose()


def test_a_rotated_secret_reaches_new_connections(redis_server: Any, moto_url: str) -> None:
    import redis

    user = _user(redis_server, "old")
    arn = _secret("old")
    provider = SecretsManagerPassword(arn, username=user, ttl_s=0)
    assert provider.get_credentials() == (user, "old")
    boto3.client("secretsmanager", region_name="us-east-1").put_secret_value(SecretId=arn, SecretString="new")
    with redis.Redis(host="127.0.0.1", port=redis_server.port) as admin:
        admin.acl_setuser(
            user, enabled=True, reset_passwords=True, passwords=["+new"], keys=["*"], commands=["+@all"]
        )
    with redis.Redis(host="127.0.0.1", port=redis_server.port, credential_provider=provider) as c:
        assert c.acl_whoami() == user


def test_a_password_and_a_secret_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="not both"):
        connect("redis://:pw@127.0.0.1:6379/0?password_secret=arn:aws:secretsmanager:us-east-1:1:secret:x")
