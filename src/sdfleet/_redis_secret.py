"""A Redis password kept in AWS Secrets Manager (``?password_secret=<ARN or name>`` on a Redis URL).

ElastiCache's AUTH token lives in Secrets Manager (the CDK app's cluster stack makes it); pods read
it with their own IAM role when they connect, so no URL, ConfigMap or Kubernetes Secret holds the
password. redis-py asks the provider on every new connection; the value is cached for ``ttl_s`` so a
rotated token reaches new connections within that time without a call per connection.
The secret is the token itself, or a JSON object with a ``password`` key (and optional ``username``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from redis.credentials import CredentialProvider

from sdfleet.errors import ConfigError


class SecretsManagerPassword(CredentialProvider):
    def __init__(self, secret_id: str, *, username: str | None = None, ttl_s: float = 60.0) -> None:
        self.secret_id = secret_id
        self.username = username
        self.ttl_s = ttl_s
        self._value: tuple[str | None, str] | None = None
        self._read_at = 0.0
        self._lock = threading.Lock()
        self._client: Any = None

    def _secrets(self) -> Any:
        if self._client is None:
            try:
                import boto3
            except ImportError as e:  # the redis engine alone does not need boto3
                raise ConfigError("password_secret needs boto3: pip install 'sdfleet[aws]'") from e
            # An ARN names its region; a plain name uses the process's (AWS_REGION, the profile).
            parts = self.secret_id.split(":")
            region = parts[3] if self.secret_id.startswith("arn:") and len(parts) > 3 else None
            self._client = boto3.client("secretsmanager", region_name=region)
        return self._client

    def _read(self) -> tuple[str | None, str]:
        text = self._secrets().get_secret_value(SecretId=self.secret_id)["SecretString"]
        try:
            doc = json.loads(text)
        except ValueError:
            return self.username, text
        if isinstance(doc, dict) and isinstance(doc.get("password"), str):
            return doc.get("username") or self.username, doc["password"]
        return self.username, text

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        with self._lock:
            if self._value is None or time.monotonic() - self._read_at > self.ttl_s:
                self._value = self._read()
                self._read_at = time.monotonic()
            user, password = self._value
        return (user, password) if user else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        # boto3 blocks: off the event loop (once per ttl_s at most)
        return await asyncio.to_thread(self.get_credentials)
