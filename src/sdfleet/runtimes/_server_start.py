"""What the server runtimes (a1111, comfyui) share at start: their server's URL, checked, and the
wait for that server to answer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from sdfleet.errors import ModelLoadError, RuntimeFailure
from sdfleet.urls import http_base

log = logging.getLogger(__name__)
T = TypeVar("T")

SAY_EVERY_S = 30.0
"""While a server does not answer, how often the wait says so (it starts saying so at once)."""


def server_url(options: Mapping[str, Any], default: str, what: str) -> str:
    """``options["url"]`` (else ``default``) without its trailing slash; a URL no HTTP client can
    call (``ftp://``, no host) is a ``ConfigError`` now, not ``ready_timeout_s`` of retries."""
    return http_base(str(options.get("url", default)), f"{what} URL")


async def wait_for_server(
    what: str, url: str, probe: Callable[[], Awaitable[T]], ready_timeout_s: float
) -> T:
    """``probe()``'s answer once the server gives one: tried again with backoff (0.1 s doubling to
    5 s) for up to ``ready_timeout_s``, then ``ModelLoadError``. The wait is said at once and every
    ``SAY_EVERY_S`` with the last failure (a side-car takes minutes to load its model; a wrong URL
    should not look like that for five silent minutes), and its end when there was one."""
    started = time.monotonic()
    deadline = started + ready_timeout_s
    delay, said = 0.1, None
    while True:
        try:
            answer = await probe()
        except RuntimeFailure as e:
            now = time.monotonic()
            if now + delay > deadline:
                raise ModelLoadError(f"{what} not ready after {ready_timeout_s:g}s: {e}") from e
            if said is None or now - said >= SAY_EVERY_S:
                waited = now - started
                log.info("waiting for %s at %s (%.0f of %g s): %s", what, url, waited, ready_timeout_s, e)
                said = now
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if said is not None:
            log.info("%s at %s answers after %.1f s", what, url, time.monotonic() - started)
        return answer
