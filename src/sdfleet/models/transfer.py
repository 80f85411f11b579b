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
import hashlib
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdfleet.errors import ChecksumMismatch, StorageError
from sdfleet.models.multipart import Multipart
from sdfleet.models.parts import (
    CHUNK,
    MIB,
    NO_SPACE,
    Stopped,
    all_or_first_error,
    disk_full,
    part_size_for,
    span,
)
from sdfleet.models.progress import Progress
from sdfleet.models.remote import SHA256_META, Checksum, ModelBucket, RemoteFile

log = logging.getLogger(__name__)

__all__ = ["MIB", "Transfers", "all_or_first_error", "part_size_for"]


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
        self.slots = asyncio.Semaphore(jobs)
        """At most ``jobs`` parts in flight, downloads and uploads together."""
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
        resumed = sum(span(i, part_size, remote.size)[1] for i in set(state.done))
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
        async with self.slots:
            if stop.is_set():
                return
            start, length = span(i, state.part_size, remote.size)
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
        sent = await Multipart(self, src, key, sha256, state_dir).run(path, size)
        self.progress.finish(path)
        return sent


def _reserve(part: Path, size: int) -> None:
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in NO_SPACE:
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
        if e.errno in NO_SPACE:
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
