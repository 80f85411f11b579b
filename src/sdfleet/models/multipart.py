"""One resumable multipart upload: its id is kept in a state file, so a rerun lists the parts S3
already has and sends only the others."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sdfleet._aws import error_code
from sdfleet.models.parts import all_or_first_error, part_size_for, span
from sdfleet.models.remote import SHA256_META

if TYPE_CHECKING:
    from sdfleet.models.transfer import Transfers

log = logging.getLogger(__name__)


class Multipart:
    """One resumable multipart upload."""

    def __init__(self, t: Transfers, src: Path, key: str, sha256: str, state_dir: Path) -> None:
        self.t, self.src, self.key, self.sha256 = t, src, key, sha256
        ident = hashlib.sha1(f"{t.bucket.bucket}/{key}".encode()).hexdigest()
        self.state_path = state_dir / f"{ident}.json"
        self.what = f"uploading {src} to s3://{t.bucket.bucket}/{key}"

    async def run(self, label: str, size: int) -> int:
        part_size = part_size_for(size, self.t.part_size)
        upload_id, have = await self._resume(size, part_size)
        if upload_id is None:
            upload_id = await self._create(size, part_size)
        resumed = sum(span(n - 1, part_size, size)[1] for n in have)
        self.t.progress.start(label, size, resumed)
        parts = dict(have)
        stop = threading.Event()
        todo = [n for n in range(1, math.ceil(size / part_size) + 1) if n not in have]
        try:
            await all_or_first_error(
                self._put_part(label, upload_id, n, part_size, size, parts, stop) for n in todo
            )
        except BaseException:
            stop.set()
            raise
        listing: Any = [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]
        await self.t.bucket.run(
            self.what,
            lambda: self.t.bucket.s3.complete_multipart_upload(
                Bucket=self.t.bucket.bucket,
                Key=self.key,
                UploadId=upload_id,
                MultipartUpload={"Parts": listing},
            ),
        )
        self.state_path.unlink(missing_ok=True)
        return size - resumed

    async def _resume(self, size: int, part_size: int) -> tuple[str | None, dict[int, str]]:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None, {}
        if [state.get("sha256"), state.get("size"), state.get("part_size")] != [self.sha256, size, part_size]:
            return None, {}
        upload_id = str(state["upload_id"])
        try:
            have = await self.t.bucket.aws.run(lambda: self._list_parts(upload_id, part_size, size))
        except ClientError as e:
            if error_code(e) in ("NoSuchUpload", "404"):
                return None, {}
            raise
        log.info("resuming upload of %s: %d parts already on S3", self.src, len(have))
        return upload_id, have

    def _list_parts(self, upload_id: str, part_size: int, size: int) -> dict[int, str]:
        s3, have, marker = self.t.bucket.s3, {}, 0
        while True:
            page = s3.list_parts(
                Bucket=self.t.bucket.bucket, Key=self.key, UploadId=upload_id, PartNumberMarker=marker
            )
            for p in page.get("Parts", []):
                n = p["PartNumber"]
                if p["Size"] == span(n - 1, part_size, size)[1]:
                    have[n] = p["ETag"]
            if not page.get("IsTruncated"):
                return have
            marker = page["NextPartNumberMarker"]

    async def _create(self, size: int, part_size: int) -> str:
        created = await self.t.bucket.run(
            self.what,
            lambda: self.t.bucket.s3.create_multipart_upload(
                Bucket=self.t.bucket.bucket, Key=self.key, Metadata={SHA256_META: self.sha256}
            ),
        )
        upload_id = str(created["UploadId"])
        state = {"upload_id": upload_id, "sha256": self.sha256, "size": size, "part_size": part_size}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps(state))
        return upload_id

    async def _put_part(
        self, label: str, upload_id: str, n: int, part_size: int, size: int, parts: dict[int, str], stop: Any
    ) -> None:
        async with self.t.slots:
            if stop.is_set():
                return
            start, length = span(n - 1, part_size, size)

            def put() -> None:
                with self.src.open("rb") as f:
                    body = os.pread(f.fileno(), length, start)
                got = self.t.bucket.s3.upload_part(
                    Bucket=self.t.bucket.bucket, Key=self.key, UploadId=upload_id, PartNumber=n, Body=body
                )
                parts[n] = got["ETag"]
                self.t.progress.advance(label, length)

            try:
                await self.t.bucket.run(self.what, put)
            except BaseException:
                stop.set()
                raise
