"""The embedded blob store: a directory on the local disk (``file:///abs/dir``).

Writes go to a temporary file beside the target and are moved into place with ``os.replace``, so a
reader sees the old bytes or the new ones, never half a file. ``expire`` deletes files stored
before a cutoff (the API runs it where finished tasks are kept for ``fleet.retain_days``; S3 has
its bucket's lifecycle rule instead). Content types are not stored: the API
guesses them from the key's extension (``mimetypes``), as S3 would be told at upload.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sdfleet.errors import ConfigError, NotFound, StorageError
from sdfleet.storage.base import check_key


@contextmanager
def map_errors(key: str, *, reading: bool = False) -> Iterator[None]:
    """Translate OS errors into ``StorageError``, or ``NotFound`` when a read finds no file."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        if not reading:
            raise StorageError(f"local storage, key {key!r}: {e}") from e
        raise NotFound(f"no file at {key!r}") from e
    except OSError as e:
        raise StorageError(f"local storage, key {key!r}: {e}") from e


def file_path(url: str) -> Path:
    """The directory of ``file:///abs/dir`` or ``file://./relative/dir`` (relative to the cwd)."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        raise ConfigError(f"not a file URL: {url!r}")
    if parts.netloc in ("", "localhost"):
        raw = parts.path
    elif parts.netloc in (".", ".."):
        raw = parts.netloc + parts.path
    else:
        raise ConfigError(f"file URL with a remote host: {url!r}; use file:///abs/dir or file://./dir")
    if not raw:
        raise ConfigError(f"file URL without a directory: {url!r}")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigError(f"file URL {url!r}: write ? and # in its path as %3F and %23")
    return Path(unquote(raw))


EMPTY_FOLDER_S = 60.0
"""How long a folder stays empty before ``expire`` removes it."""


class LocalBlobStore:
    """``BlobStore`` on a local directory; ``presign()`` is None (the API signs its own links)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    @classmethod
    def from_url(cls, url: str) -> LocalBlobStore:
        return cls(file_path(url))

    async def __aenter__(self) -> LocalBlobStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def path(self, key: str) -> Path:
        """The file that holds ``key``; raises ``ValidationFailed`` for a bad key."""
        return self.root / check_key(key)

    def _write(self, key: str, data: bytes) -> None:
        target = self.path(key)
        with map_errors(key):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            except FileNotFoundError:  # ``expire`` removed the empty folder just then: make it again
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def _read(self, key: str) -> bytes:
        target = self.path(key)
        with map_errors(key, reading=True):
            return target.read_bytes()

    async def put(self, key: str, data: bytes, content_type: str) -> str:
        """Store ``data`` under ``key`` atomically; returns its ``file://`` location."""
        await asyncio.to_thread(self._write, key, data)
        return self.location(key)

    async def get(self, key: str) -> bytes:
        """The bytes at ``key``; raises ``NotFound``."""
        return await asyncio.to_thread(self._read, key)

    async def exists(self, key: str) -> bool:
        """Whether a file is stored under ``key``."""
        target = self.path(key)
        with map_errors(key, reading=True):
            return await asyncio.to_thread(target.is_file)

    async def files(self, folder: str) -> list[str]:
        """The files directly in ``folder`` (not the temporary ones of a write in progress)."""
        where = self.path(folder)

        def names() -> list[str]:
            try:
                found = [p.name for p in where.iterdir() if p.is_file() and not p.name.startswith(".")]
            except (FileNotFoundError, NotADirectoryError):
                return []
            return sorted(f"{folder}/{name}" for name in found)

        with map_errors(folder):
            return await asyncio.to_thread(names)

    async def delete(self, keys: Sequence[str]) -> None:
        """Unlink the files of ``keys`` (missing ones are fine), then their folders left empty."""
        paths = [self.path(k) for k in keys]  # every key checked before anything goes

        def unlink() -> None:
            for path, key in zip(paths, keys, strict=True):
                with map_errors(key):
                    path.unlink(missing_ok=True)
            for folder in sorted({p.parent for p in paths}, key=lambda f: len(f.parts), reverse=True):
                while folder != self.root:
                    try:
                        folder.rmdir()
                    except OSError:  # not empty (another task's files), or gone
                        break
                    folder = folder.parent

        await asyncio.to_thread(unlink)

    def location(self, key: str) -> str:
        """``file:///abs/path`` of ``key``."""
        return self.path(key).as_uri()

    async def presign(self, key: str, expires_s: int) -> str | None:
        """Always None: local files are served by the API's signed ``/v1/files`` links."""
        check_key(key)
        return None

    async def expire(self, older_than_s: float) -> int:
        """Delete the files last written more than ``older_than_s`` ago, and folders left empty
        for a minute; returns how many files went."""
        return await asyncio.to_thread(self._expire, time.time() - older_than_s)

    def _expire(self, cutoff: float) -> int:
        removed = 0
        for folder, _, names in os.walk(self.root, topdown=False):
            for name in names:
                path = Path(folder, name)
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:  # another API replica's sweep took it
                    continue
            here = Path(folder)
            try:
                # Emptied by an earlier pass and untouched since: a write into it would have
                # changed its time (and ``_write`` makes it again if it races this).
                if here != self.root and here.stat().st_mtime < time.time() - EMPTY_FOLDER_S:
                    here.rmdir()
            except OSError:  # not empty, or gone
                continue
        return removed

    async def aclose(self) -> None:
        """Nothing to release."""
