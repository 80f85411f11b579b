"""Blob storage on S3 (``s3://bucket/prefix``).

URL: ``s3://bucket[/prefix][?region=eu-west-1][&create=false][&retries=3]``

- keys live under ``prefix/`` in ``bucket``; ``location(key)`` is ``s3://bucket/prefix/key``, the
  form the seed reports in ``output_location``;
- ``create`` (default false): create the bucket on first use if it is missing. Off by default: in
  production the bucket (encryption, lifecycle, public-access block) comes from CDK, and neither
  the API's nor the agent's role should hold ``s3:CreateBucket``. Demos and tests pass ``create=true``;
- ``retries``: attempts per call (botocore "standard" mode), default 3;
- ``presign(key, expires_s)`` is a ``GetObject`` URL signed with the caller's credentials
  (computed locally; the URL is only as good as those credentials' lifetime, hours under IRSA);
- endpoint and credentials come from the standard AWS chain (``AWS_ENDPOINT_URL`` for moto).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sdfleet._aws import AwsContext, error_code, flag, int_param, map_errors, parse_aws_url
from sdfleet.errors import ConfigError, NotFound, StorageError, StorageUnavailable
from sdfleet.storage.base import check_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_MISSING = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})


class S3BlobStore:
    """``BlobStore`` on one S3 bucket under a key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        region: str | None = None,
        create: bool = False,
        max_attempts: int = 3,
    ) -> None:
        if not bucket:
            raise ConfigError("s3:// URL without a bucket; use s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.create_bucket = create
        self._aws = AwsContext(region, max_attempts=max_attempts)
        self._ready = not create
        self._ready_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> S3BlobStore:
        bucket, prefix, q = parse_aws_url(url, "s3")
        create = flag(q, "create", False)
        return cls(
            bucket, prefix, region=q.get("region"), create=create, max_attempts=int_param(q, "retries", 3)
        )

    @property
    def _s3(self) -> S3Client:
        client: S3Client = self._aws.client("s3")
        return client

    def key(self, key: str) -> str:
        """The S3 object key of ``key``; raises ``ValidationFailed`` for a bad key."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _ensure_bucket(self) -> None:
        with self._ready_lock:
            if self._ready:
                return
            try:
                self._s3.head_bucket(Bucket=self.bucket)
            except ClientError as e:
                if error_code(e) not in _MISSING:
                    raise
                region = self._s3.meta.region_name
                extra: Any = (
                    {}
                    if region in (None, "us-east-1")
                    else {"CreateBucketConfiguration": {"LocationConstraint": region}}
                )
                self._s3.create_bucket(Bucket=self.bucket, **extra)
            self._ready = True

    async def _run(self, fn: Any) -> Any:
        def call() -> Any:
            self._ensure_bucket()
            return fn()

        with map_errors(StorageUnavailable, StorageError):
            return await self._aws.run(call)

    async def put(self, key: str, data: bytes, content_type: str) -> str:
        """``PutObject`` with ``ContentType``; returns ``s3://bucket/prefix/key``."""
        k = self.key(key)
        await self._run(
            lambda: self._s3.put_object(Bucket=self.bucket, Key=k, Body=data, ContentType=content_type)
        )
        return self.location(key)

    async def get(self, key: str) -> bytes:
        """``GetObject``; raises ``NotFound``."""
        k = self.key(key)

        def get() -> bytes:
            body: bytes = self._s3.get_object(Bucket=self.bucket, Key=k)["Body"].read()
            return body

        try:
            data: bytes = await self._run(get)
        except NotFound as e:
            raise NotFound(f"no object at {key!r}") from e
        return data

    async def exists(self, key: str) -> bool:
        """``HeadObject``: True iff an object is stored under exactly ``key``."""
        k = self.key(key)

        def head() -> bool:
            try:
                self._s3.head_object(Bucket=self.bucket, Key=k)
            except ClientError as e:
                if error_code(e) in _MISSING:
                    return False
                raise
            return True

        found: bool = await self._run(head)
        return found

    async def files(self, folder: str) -> list[str]:
        """``ListObjectsV2`` of ``folder/`` with delimiter ``/`` (its direct children), every page."""
        start = self.key(folder) + "/"

        def listed() -> list[str]:
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start, Delimiter="/"
            )
            return [f"{folder}/{o['Key'][len(start) :]}" for page in pages for o in page.get("Contents", [])]

        keys: list[str] = await self._run(listed)
        return sorted(keys)

    async def delete(self, keys: Sequence[str]) -> None:
        """``DeleteObjects`` (1,000 keys a call); a key that holds nothing is no error (S3's own
        rule), a key S3 refuses (``AccessDenied``…) is a ``StorageError``."""
        objects = [{"Key": self.key(k)} for k in keys]

        def delete() -> None:
            for start in range(0, len(objects), 1000):
                batch: Any = {"Objects": objects[start : start + 1000], "Quiet": True}
                errors = self._s3.delete_objects(Bucket=self.bucket, Delete=batch).get("Errors", [])
                if errors:
                    first = errors[0]
                    raise StorageError(
                        f"s3://{self.bucket}/{first.get('Key')} not deleted: "
                        f"{first.get('Code')}: {first.get('Message')} ({len(errors)} keys refused)"
                    )

        if objects:
            await self._run(delete)

    def location(self, key: str) -> str:
        """``s3://bucket/prefix/key``."""
        return f"s3://{self.bucket}/{self.key(key)}"

    async def presign(self, key: str, expires_s: int) -> str | None:
        """A presigned ``GetObject`` URL valid for ``expires_s`` seconds (at most 7 days)."""
        k = self.key(key)
        expires = max(1, min(int(expires_s), 7 * 24 * 3600))

        def sign() -> str:
            return self._s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": k}, ExpiresIn=expires
            )

        with map_errors(StorageUnavailable, StorageError):
            url: str = await self._aws.run(sign)
        return url

    async def aclose(self) -> None:
        self._aws.close()

    async def __aenter__(self) -> S3BlobStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
