"""URLs a person gives or the settings make.

Base URLs (``--api``, a runtime's ``url``): one that no HTTP client can call (``ftp://``,
``localhost:8080`` without its scheme, no host) is said at once, in one line, not as the client
library's complaint at the first request or minutes of retries.

Local files as URLs (``sqlite:///…``, ``file:///…``): a path is percent-quoted into its URL and
unquoted out of it, so a folder named ``my #1 fleet`` or ``50%`` stays that folder (unquoted, ``#``
starts a fragment and the path is cut there).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from sdfleet.errors import ConfigError


def http_base(given: str, what: str) -> str:
    """``given`` without its trailing slash when it is ``http(s)://host[:port][/path]``; else
    ``ConfigError`` naming ``what`` (``"--api"``, ``"SD WebUI URL"``) and the form it needs."""
    parts = urlsplit(given)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} {given!r}: use http://host:port (or https://)")
    return given.rstrip("/")


SQLITE_FORMS = "sqlite:///relative.db or sqlite:////abs/path.db"


def sqlite_url(path: Path) -> str:
    """The ``sqlite:////abs/path.db`` URL of a file (made absolute, percent-quoted)."""
    return "sqlite:///" + quote(str(path.absolute()))


def file_url(path: Path) -> str:
    """The ``file:///abs/dir`` URL of a folder (made absolute, percent-quoted)."""
    return path.absolute().as_uri()


def sqlite_file(url: str) -> str | None:
    """The file of a sqlite URL (relative to the working directory with three slashes, absolute
    with four); None for ``sqlite://``, an in-memory database. ``ConfigError`` for anything else,
    a ``?`` or ``#`` included: a path holding them is written ``%3F`` and ``%23``."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.netloc or (parts.path and not parts.path.startswith("/")):
        raise ConfigError(f"not a sqlite URL: {url!r}; use {SQLITE_FORMS}")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigError(f"sqlite URL {url!r}: write ? and # in its path as %3F and %23")
    if not parts.path:
        return None
    path = unquote(parts.path[1:])
    if not path:
        raise ConfigError(f"sqlite URL without a file: {url!r}; use {SQLITE_FORMS}")
    return path
