"""Input images at ``s3://bucket/key`` URLs, as the seed's agent reads them: with the agent's own
AWS credentials, only from buckets the operator allowlisted, bounded like any input.

``S3Inputs(["my-bucket", "other-bucket/inputs/"])`` allows every key of ``my-bucket`` and the keys
of ``other-bucket`` under ``inputs/``. Needs the ``aws`` extra (boto3), imported on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from sdfleet.errors import InputFetchError, InputUnavailable, UrlRefused

if TYPE_CHECKING:
    from sdfleet._aws import AwsContext


def parse_s3_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    key = unquote(parts.path.lstrip("/"))
    if parts.scheme.lower() != "s3" or not parts.netloc or not key:
        raise UrlRefused(f"not an s3://bucket/key URL: {url!r}")
    return parts.netloc, key


class S3Inputs:
    def __init__(self, allowed: Sequence[str], *, region: str | None = None) -> None:
        self.allowed = [a.strip() for a in allowed if a.strip()]
        self._region = region
        self._aws: AwsContext | None = None

    def check(self, url: str) -> tuple[str, str]:
        """(bucket, key) of an allowed ``url``; ``UrlRefused`` otherwise."""
        bucket, key = parse_s3_url(url)
        for rule in self.allowed:
            name, _, prefix = rule.partition("/")
            if name == bucket and key.startswith(prefix):
                return bucket, key
        raise UrlRefused(
            f"s3://{bucket}/ is not an allowed input bucket"
            f" (agent.input_s3_buckets: {self.allowed or 'none'})"
        )

    async def fetch(self, url: str, max_bytes: int) -> bytes:
        """The object's bytes, at most ``max_bytes``. Raises ``UrlRefused``, ``InputUnavailable``
        (throttled, a 5xx, S3 unreachable: worth a retry) or ``InputFetchError``."""
        bucket, key = self.check(url)
        aws = self._context()
        from botocore.exceptions import BotoCoreError, ClientError

        from sdfleet._aws import transient

        def read() -> bytes:
            s3: Any = aws.client("s3")
            # One byte past the limit: a larger object is refused without reading it whole.
            obj = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{max_bytes}")
            total = int(str(obj.get("ContentRange", "")).rpartition("/")[2] or obj["ContentLength"])
            if total > max_bytes:
                raise InputFetchError(f"{url} is {total} bytes, more than the {max_bytes} allowed")
            return bytes(obj["Body"].read())

        try:
            return await aws.run(read)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            kind = InputUnavailable if transient(e) else InputFetchError
            raise kind(f"cannot read {url}: {code or e}") from e
        except BotoCoreError as e:
            kind = InputUnavailable if transient(e) else InputFetchError
            raise kind(f"cannot read {url}: {e}") from e

    def _context(self) -> AwsContext:
        if self._aws is None:
            try:
                from sdfleet._aws import AwsContext
            except ImportError as e:  # pragma: no cover - the aws extra is part of every install here
                raise InputFetchError("s3:// inputs need the aws extra: pip install 'sdfleet[aws]'") from e
            self._aws = AwsContext(self._region, max_workers=4)
        return self._aws

    def close(self) -> None:
        if self._aws is not None:
            self._aws.close()
            self._aws = None
