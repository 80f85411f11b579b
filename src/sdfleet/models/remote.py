"""Models under an S3 prefix (``models.s3``): listing, object metadata, and errors people can act on.

Every object sdfleet uploads carries its SHA-256 in the user metadata ``sha256``, so a download
is checked end to end whatever the part size. Objects put there by other tools (``aws s3 sync``)
are checked against their ETag when it is a plain MD5 (single-part uploads) and by size otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sdfleet._aws import AwsContext, error_code, map_errors, parse_aws_url
from sdfleet.errors import ConfigError, NotFound, StorageError, StorageUnavailable
from sdfleet.models.layout import ModelFiles, group

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

SHA256_META = "sha256"
_DENIED = frozenset({"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"})


@dataclass(frozen=True)
class RemoteFile:
    path: str
    """Relative to the prefix, POSIX form (``x.safetensors``, ``x/unet/config.json``)."""
    size: int
    etag: str
    modified: float


@dataclass(frozen=True)
class Checksum:
    """What a downloaded file is checked against: SHA-256 from metadata, else a plain MD5 ETag."""

    sha256: str | None = None
    md5: str | None = None

    @property
    def known(self) -> bool:
        return bool(self.sha256 or self.md5)


class ModelBucket:
    """The models under ``s3://bucket/prefix``; blocking calls run in ``aws``'s thread pool."""

    def __init__(self, url: str, *, jobs: int = 8) -> None:
        bucket, prefix, query = parse_aws_url(url, "s3")
        if not bucket:
            raise ConfigError(f"{url!r} names no bucket; use s3://bucket/prefix")
        self.url = url.split("?", 1)[0].rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.aws = AwsContext(query.get("region"), max_workers=jobs + 2, max_attempts=5)

    @property
    def s3(self) -> S3Client:
        client: S3Client = self.aws.client("s3")
        return client

    def key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """botocore errors → sdfleet errors that name the bucket and what was being done."""
        try:
            with map_errors(StorageUnavailable, StorageError):
                try:
                    yield
                except ClientError as e:
                    explained = self._explain(e, what)
                    if explained is None:
                        raise
                    raise explained from e
        except NotFound as e:
            raise NotFound(f"{what}: {e.message}") from e

    def _explain(self, e: ClientError, what: str) -> Exception | None:
        code = error_code(e)
        if code == "NoSuchBucket":
            return NotFound(f"bucket {self.bucket!r} does not exist")
        if code in _DENIED:
            return ConfigError(
                f"{what}: access to {self.url} denied ({code}); the credentials need s3:ListBucket, "
                "s3:GetObject and, to push, s3:PutObject on it"
            )
        return None

    async def run(self, what: str, fn: Any) -> Any:
        def call() -> Any:
            with self.errors(what):
                return fn()

        return await self.aws.run(call)

    def list_files_blocking(self) -> list[RemoteFile]:
        base = f"{self.prefix}/" if self.prefix else ""
        out: list[RemoteFile] = []
        with self.errors(f"listing {self.url}"):
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(base) :]
                    if rel and not rel.endswith("/"):
                        modified = obj["LastModified"].timestamp()
                        out.append(RemoteFile(rel, obj["Size"], obj["ETag"].strip('"'), modified))
        return out

    async def list_models(self) -> dict[str, tuple[ModelFiles, dict[str, RemoteFile]]]:
        """Model name → (its files and sizes, the listing entry of each file)."""
        files = {f.path: f for f in await self.aws.run(self.list_files_blocking)}
        out = {}
        for name, paths in group(files).items():
            out[name] = (ModelFiles(name, {p: files[p].size for p in paths}), {p: files[p] for p in paths})
        return out

    def checksum_blocking(self, path: str) -> Checksum:
        """HEAD ``path``: its SHA-256 metadata, else its ETag when that is a plain MD5."""
        with self.errors(f"reading s3://{self.bucket}/{self.key(path)}"):
            head = self.s3.head_object(Bucket=self.bucket, Key=self.key(path))
        sha = head.get("Metadata", {}).get(SHA256_META)
        etag = head["ETag"].strip('"')
        return Checksum(sha256=sha, md5=etag if "-" not in etag and len(etag) == 32 else None)

    def close(self) -> None:
        self.aws.close()

    async def __aenter__(self) -> ModelBucket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
