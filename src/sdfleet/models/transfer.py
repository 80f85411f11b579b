"""Moving one file to or from S3: in parts, in parallel, resumable, verified.

Download: ranged GETs written at their offsets into ``<dest>.part``, with the parts done recorded in
``<dest>.part.json`` after each one; a rerun with the same object (ETag) and part size fetches only
the rest. Space for the whole file is reserved first (``posix_fallocate``), so a full disk fails
at once. The finished file is checked (SHA-256 metadata, else a plain-MD5 ETag) before it gets its
final name; a mismatch deletes it. Upload: one PUT up to the part size, else a multipart upload
whose id is kept in a state file, so a rerun lists the parts S3 already has and sends the rest.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from sdfleet._aws import error_code
from sdfleet.errors import ChecksumMismatch, DiskFull, StorageError
from sdfleet.models.progress import Progress
from sdfleet.models.remote import SHA256_META, Checksum, ModelBucket, RemoteFile

log = logging.getLogger(__name__)

MIB = 2**20
CHUNK = MIB
MAX_PARTS = 10_000
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class Stopped(Exception):
    """A sibling part failed or the transfer was cancelled: stop between chunks."""


def part_size_for(size: int, wanted: int) -> int:
    """``wanted``, raised to whole MiB when ``size`` would need more than S3's 10,000 parts."""
    return max(wanted, math.ceil(size / MAX_PARTS / MIB) * MIB)


def disk_full(path: Path, e: OSError) -> DiskFull:
    return DiskFull(f"no room for {path.name} in {path.parent}: {os.strerror(e.errno or errno.ENOSPC)}")


@dataclass
class _State:
    """What a resumed download must match, and the parts it already has."""

    etag: str
    size: int
    part_size: int
    done: list[int] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path, remote: RemoteFile, part_size: int) -> _State | None:
        try:
            raw = json.loads(path.read_text())
            state = cls(raw["etag"], raw["size"], raw["part_size"], [int(i) for i in raw["done"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        same = (state.etag, state.size, state.part_size) == (remote.etag, remote.size, part_size)
        return state if same else None

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.__dict__))
        os.replace(tmp, path)


class Transfers:
    """File transfers against one ``ModelBucket``, at most ``jobs`` parts in flight in all."""

    def __init__(self, bucket: ModelBucket, progress: Progress, *, part_size: int, jobs: int) -> None:
        self.bucket = bucket
        self.progress = progress
        self.part_size = part_size
        self._slots = asyncio.Semaphore(jobs)
        self._state_lock = threading.Lock()

    async def download(self, remote: RemoteFile, dest: Path, checksum: Checksum) -> int:
        """Fetch ``remote`` to ``dest`` (atomically, verified); returns the bytes actually fetched."""
        part, state_path = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")
        part_size = part_size_for(remote.size, self.part_size)
        state = _State.load(state_path, remote, part_size) if part.exists() else None
        if state is None:
            state = _State(remote.etag, remote.size, part_size)
            part.unlink(missing_ok=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        state.save(state_path)
        count = math.ceil(remote.size / part_size)
        resumed = sum(_span(i, part_size, remote.size)[1] for i in set(state.done))
        self.progress.start(remote.path, remote.size, resumed)
        await asyncio.to_thread(_reserve, part, remote.size)
        stop = threading.Event()
        todo = sorted(set(range(count)) - set(state.done))
        try:
            await all_or_first_error(self._get_part(remote, part, i, state, state_path, stop) for i in todo)
        except BaseException:
            stop.set()
            raise
        await asyncio.to_thread(_verify, part, checksum, remote, (part, state_path))
        os.replace(part, dest)
        state_path.unlink(missing_ok=True)
        self.progress.finish(remote.path)
        return remote.size - resumed

    async def _get_part(
        self, remote: RemoteFile, part: Path, i: int, state: _State, state_path: Path, stop: threading.Event
    ) -> None:
        async with self._slots:
            if stop.is_set():
                return
            start, length = _span(i, state.part_size, remote.size)
            key = self.bucket.key(remote.path)

            def fetch() -> None:
                s3 = self.bucket.s3
                got = s3.get_object(
                    Bucket=self.bucket.bucket,
                    Key=key,
                    Range=f"bytes={start}-{start + length - 1}",
                    IfMatch=f'"{remote.etag}"',
                )
                advance = self.progress.advance
                _write_stream(got["Body"], part, start, length, stop, lambda n: advance(remote.path, n))
                with self._state_lock:
                    state.done.append(i)
                    state.save(state_path)

            try:
                await self.bucket.run(f"downloading s3://{self.bucket.bucket}/{key}", fetch)
            except StorageError as e:
                stop.set()
                if "PreconditionFailed" in e.message or "412" in e.message:
                    raise StorageError(
                        f"{remote.path} changed on S3 while it was downloading; run again"
                    ) from e
                raise
            except BaseException:
                stop.set()
                raise

    async def upload(self, src: Path, path: str, sha256: str, state_dir: Path) -> int:
        """Send ``src`` to ``path`` under the prefix with its SHA-256; returns the bytes sent."""
        size = src.stat().st_size
        key = self.bucket.key(path)
        if size <= self.part_size:
            self.progress.start(path, size)

            def put() -> None:
                body = src.read_bytes()
                self.bucket.s3.put_object(
                    Bucket=self.bucket.bucket, Key=key, Body=body, Metadata={SHA256_META: sha256}
                )
                self.progress.advance(path, size)

            await self.bucket.run(f"uploading {src} to s3://{self.bucket.bucket}/{key}", put)
            self.progress.finish(path)
            return size
        sent = await _Multipart(self, src, key, sha256, state_dir).run(path, size)
        self.progress.finish(path)
        return sent


class _Multipart:
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
        resumed = sum(_span(n - 1, part_size, size)[1] for n in have)
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
                if p["Size"] == _span(n - 1, part_size, size)[1]:
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
        async with self.t._slots:
            if stop.is_set():
                return
            start, length = _span(n - 1, part_size, size)

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


async def all_or_first_error(coros: Iterable[Coroutine[Any, Any, Any]]) -> None:
    """Run ``coros`` together; when one fails the others are cancelled and its error is raised as
    itself (not an ``ExceptionGroup``: callers and the CLI deal in sdfleet errors)."""
    try:
        async with asyncio.TaskGroup() as group:
            for coro in coros:
                group.create_task(coro)
    except BaseExceptionGroup as eg:
        first = next(iter(_leaves(eg)))
        raise first from None


def _leaves(eg: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


def _span(i: int, part_size: int, size: int) -> tuple[int, int]:
    """Offset and length of part ``i`` (0-based)."""
    start = i * part_size
    return start, max(0, min(part_size, size - start))


def _reserve(part: Path, size: int) -> None:
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise disk_full(part, e) from e
        raise
    finally:
        os.close(fd)


def _write_stream(
    body: Any, part: Path, start: int, length: int, stop: threading.Event, advance: Any
) -> None:
    fd = os.open(part, os.O_WRONLY)
    try:
        offset, end = start, start + length
        while offset < end:
            if stop.is_set():
                raise Stopped()
            chunk = body.read(min(CHUNK, end - offset))
            if not chunk:
                raise StorageError(f"{part.name}: the connection ended {end - offset} bytes early")
            os.pwrite(fd, chunk, offset)
            offset += len(chunk)
            advance(len(chunk))
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise disk_full(part, e) from e
        raise
    finally:
        os.close(fd)
        body.close()


def _verify(path: Path, checksum: Checksum, remote: RemoteFile, cleanup: tuple[Path, ...]) -> None:
    if not checksum.known:
        log.warning("%s has no checksum on S3 (not uploaded by sdfleet): checked by size only", remote.path)
        return
    algo = "sha256" if checksum.sha256 else "md5"
    want = checksum.sha256 or checksum.md5
    digest = hashlib.new(algo)
    with path.open("rb") as f:
        while block := f.read(4 * MIB):
            digest.update(block)
    if digest.hexdigest() != want:
        for p in cleanup:
            p.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{remote.path}: the downloaded bytes have {algo} {digest.hexdigest()}, S3 says {want}; "
            "the download was deleted (run the pull again; if it fails again the object on S3 is corrupt)"
        )
