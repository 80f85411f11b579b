"""Base URLs a person gives (``--api``, a runtime's ``url``): one that no HTTP client can call
(``ftp://``, ``localhost:8080`` without its scheme, no host) is said at once, in one line, not as
the client library's complaint at the first request or minutes of retries."""

from __future__ import annotations

from urllib.parse import urlsplit

from sdfleet.errors import ConfigError


def http_base(given: str, what: str) -> str:
    """``given`` without its trailing slash when it is ``http(s)://host[:port][/path]``; else
    ``ConfigError`` naming ``what`` (``"--api"``, ``"SD WebUI URL"``) and the form it needs."""
    parts = urlsplit(given)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} {given!r}: use http://host:port (or https://)")
    return given.rstrip("/")
