"""``s3://`` input URLs, read from moto's S3 (server mode) like the seed's agent does: only from
allowlisted buckets and prefixes, bounded like any input, clear errors otherwise."""

from __future__ import annotations

import io
import random
import uuid
from collections.abc import Iterator

import boto3
import pytest
from PIL import Image

from fakes.servers import free_port
from sdfleet.errors import InputFetchError, InputUnavailable, UrlRefused
from sdfleet.guarded_http import InputFetcher, fetcher_from_options


def png(size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), random.Random(size).randbytes(3 * size * size)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


@pytest.fixture
def bucket(moto_url: str) -> Iterator[str]:
    name = f"in-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="inputs/cat.png", Body=png())
    s3.put_object(Bucket=name, Key="private/dog.png", Body=png())
    s3.put_object(Bucket=name, Key="inputs/big.png", Body=png(512))
    yield name
    s3.close()


async def test_allowed_bucket_and_prefix(bucket: str) -> None:
    async with InputFetcher(
        max_bytes=10_000, timeout_s=5, allow_private=False, s3_buckets=[f"{bucket}/inputs/"]
    ) as f:
        assert await f.fetch(f"s3://{bucket}/inputs/cat.png") == png()
        with pytest.raises(UrlRefused, match="not an allowed input bucket"):
            await f.fetch(f"s3://{bucket}/private/dog.png")
        with pytest.raises(UrlRefused, match="not an allowed input bucket"):
            await f.fetch("s3://someone-elses-bucket/inputs/cat.png")
        with pytest.raises(InputFetchError, match="more than the 10000 allowed"):
            await f.fetch(f"s3://{bucket}/inputs/big.png")
        with pytest.raises(InputFetchError, match="NoSuchKey") as caught:
            await f.fetch(f"s3://{bucket}/inputs/missing.png")
        assert not isinstance(caught.value, InputUnavailable)  # failed at once, not retried
        with pytest.raises(UrlRefused, match="not an s3://bucket/key URL"):
            await f.fetch(f"s3://{bucket}")


async def test_off_unless_configured(bucket: str) -> None:
    async with InputFetcher(max_bytes=10_000, timeout_s=5, allow_private=False) as f:
        with pytest.raises(UrlRefused, match="input_s3_buckets"):
            await f.fetch(f"s3://{bucket}/inputs/cat.png")
    runtime_fetcher = fetcher_from_options({"input_s3_buckets": [bucket]})
    try:
        assert await runtime_fetcher.fetch(f"s3://{bucket}/private/dog.png") == png()
    finally:
        await runtime_fetcher.aclose()


async def test_s3_that_cannot_answer_now_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 down (nothing listens at its endpoint): the agent retries the task, not fails it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    async with InputFetcher(max_bytes=10_000, timeout_s=5, allow_private=False, s3_buckets=["in"]) as f:
        with pytest.raises(InputUnavailable, match="Could not connect"):
            await f.fetch("s3://in/cat.png")
