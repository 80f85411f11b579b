"""Signed task webhooks, with cog's delivery policy.

A task that carries ``webhook: {url, events}`` gets a POST of its ``TaskEvent`` JSON (schema 1) for
each subscribed event. Every request is signed twice under the fleet's secret:

- `Standard Webhooks <https://www.standardwebhooks.com>`_: ``webhook-id`` (the delivery id, the
  same on every retry), ``webhook-timestamp`` and ``webhook-signature`` (``v1,<base64>``), made by
  the ``standardwebhooks`` library, so any of its verifiers checks them (``standard_key`` says
  which key bytes a ``whsec_`` secret and any other secret stand for);
- the earlier ``X-Sdfleet-Signature: sha256=<hex>``, the HMAC-SHA256 of
  ``"<X-Sdfleet-Timestamp>.<body>"`` (see ``verify``), kept for one release.

- Terminal events (succeeded, failed, cancelled) are retried with exponential backoff on connection
  errors, 429 and 5xx for up to ``max_retry_s`` (a ``Retry-After`` longer than the backoff is
  waited); any other 4xx or a redirect ends it (logged).
- Non-terminal events (started, progress) are sent once, at most one per ``throttle_s`` per task;
  a failure is logged and forgotten.
- Deliveries run in background tasks owned by the notifier, so a slow or dead receiver never holds
  up the agent's next task; the events of one task go out in order. ``aclose`` waits up to
  ``drain_s`` for what is still in flight and logs what it gives up.
- The URL passes the SSRF guard (``check_url``) at every try, and the request goes to the address
  the guard approved (no second DNS lookup to rebind).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import functools
import hashlib
import hmac
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

import httpx
from standardwebhooks import Webhook

from sdfleet.errors import InputFetchError, UrlRefused
from sdfleet.guarded_http import Resolve, guarded_client, pinned_target, resolve_host, retry_after_s
from sdfleet.tasks import EventType, TaskEvent, TaskRecord, new_task_id

log = logging.getLogger(__name__)

TERMINAL = frozenset({EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED})
MAX_BACKOFF_S = 60.0
_THROTTLE_MEMORY = 10_000  # tasks whose last non-terminal send time is remembered


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Sdfleet-Signature`` value for ``body`` sent at ``timestamp``: ``sha256=<hex>``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, tolerance_s: float = 300) -> bool:
    """A receiver's check: the signature matches and the timestamp is within ``tolerance_s``."""
    try:
        age = abs(time.time() - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


@functools.cache
def _warn_unsigned() -> None:
    """Once per process, however many agents it runs, and only once a task asks for a webhook."""
    log.warning(
        "SDFLEET_WEBHOOK__SECRET is not set: task webhooks are sent unsigned and receivers "
        "cannot verify them; set a secret in production"
    )


def standard_key(secret: str) -> bytes:
    """The HMAC key of the Standard Webhooks signature: a ``whsec_<base64>`` secret (the spec's
    form) is its decoded bytes, any other secret its UTF-8 bytes. A receiver verifies with
    ``standardwebhooks.Webhook(secret)`` for the former, ``Webhook(secret.encode())`` for the latter."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_") + "==", validate=False)
        except (binascii.Error, ValueError):
            pass  # not base64 after all: the text is the key
    return secret.encode()


class _Outcome(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    GIVE_UP = "give up"


@dataclass(frozen=True)
class _Delivery:
    id: str
    task_id: str
    url: str
    event: EventType
    body: bytes

    def __str__(self) -> str:
        return f"{self.event.value} of task {self.task_id} to {self.url} (delivery {self.id})"


class WebhookNotifier:
    """Delivers task events to the task's own webhook. One per agent; owns its client unless given one."""

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        secret: str,
        allow_private: bool,
        timeout_s: float = 10.0,
        max_retry_s: float = 300.0,
        backoff_s: float = 1.0,
        throttle_s: float = 0.5,
        drain_s: float = 10.0,
        resolve: Resolve = resolve_host,
    ) -> None:
        self.secret = secret
        """Empty: requests go out unsigned (no signature headers)."""
        self._standard = Webhook(standard_key(secret)) if secret else None
        self.allow_private = allow_private
        self.max_retry_s = max_retry_s
        self.backoff_s = backoff_s
        self.throttle_s = throttle_s
        self.drain_s = drain_s
        self._resolve = resolve
        self._owns_client = client is None
        self._client = client or guarded_client(timeout_s)
        self._jobs: dict[asyncio.Task[None], _Delivery] = {}
        self._tails: dict[str, asyncio.Task[None]] = {}
        self._last_sent: OrderedDict[str, float] = OrderedDict()
        self._closed = False

    async def notify(self, record: TaskRecord, event: TaskEvent) -> None:
        """Schedule the delivery of ``event`` if the task subscribed to it; returns at once."""
        hook = record.task.webhook
        if hook is None or event.type.value not in hook.events:
            return
        if not self.secret:
            _warn_unsigned()
        terminal = event.type in TERMINAL
        if self._closed:
            log.warning("webhook %s of task %s dropped: notifier closed", event.type.value, record.id)
            return
        prev = self._tails.get(record.id)
        if not terminal and ((prev is not None and not prev.done()) or self._throttled(record.id)):
            return  # intermediate events are best effort: drop rather than queue up
        if terminal:
            self._last_sent.pop(record.id, None)
        body = event.model_dump_json(by_alias=True).encode()
        d = _Delivery(new_task_id(), record.id, hook.url, event.type, body)
        job = asyncio.create_task(self._deliver(d, prev, terminal), name=f"webhook-{d.id}")
        self._jobs[job] = d
        self._tails[record.id] = job
        job.add_done_callback(self._forget)

    async def delivered(self, task_id: str) -> None:
        """Until the task's deliveries so far are done (delivered, refused, or given up after
        ``max_retry_s``)."""
        tail = self._tails.get(task_id)
        if tail is not None:
            await asyncio.wait({tail})

    def _throttled(self, task_id: str) -> bool:
        now = time.monotonic()
        last = self._last_sent.get(task_id)
        if last is not None and now - last < self.throttle_s:
            return True
        self._last_sent[task_id] = now
        self._last_sent.move_to_end(task_id)
        if len(self._last_sent) > _THROTTLE_MEMORY:
            self._last_sent.popitem(last=False)
        return False

    def _forget(self, job: asyncio.Task[None]) -> None:
        d = self._jobs.pop(job, None)
        if d is not None and self._tails.get(d.task_id) is job:
            del self._tails[d.task_id]

    async def _deliver(self, d: _Delivery, prev: asyncio.Task[None] | None, terminal: bool) -> None:
        if prev is not None:
            await asyncio.wait({prev})  # keep a task's events in order
        try:
            if terminal:
                await self._with_retries(d)
            else:
                outcome, why, _ = await self._attempt(d)
                if outcome is not _Outcome.DELIVERED:
                    log.info("webhook %s not delivered (not retried): %s", d, why)
        except Exception:  # a background job must never die with an unretrieved exception
            log.exception("webhook %s: unexpected error", d)

    async def _with_retries(self, d: _Delivery) -> None:
        deadline = time.monotonic() + self.max_retry_s
        delay, tries = self.backoff_s, 0
        while True:
            tries += 1
            outcome, why, after = await self._attempt(d)
            if outcome is _Outcome.DELIVERED:
                return
            if outcome is _Outcome.GIVE_UP:
                log.warning("webhook %s given up: %s", d, why)
                return
            # the receiver's Retry-After when it asks for longer than the backoff
            wait = max(min(delay, MAX_BACKOFF_S) * random.uniform(0.8, 1.2), after or 0.0)
            if time.monotonic() + wait > deadline:
                log.error("webhook %s given up after %d tries in %.0f s: %s", d, tries, self.max_retry_s, why)
                return
            log.info("webhook %s try %d failed (%s); retrying in %.1f s", d, tries, why, wait)
            await asyncio.sleep(wait)
            delay *= 2

    async def _attempt(self, d: _Delivery) -> tuple[_Outcome, str, float | None]:
        """One try: its outcome, why, and the wait a 429 or 5xx asked for (``Retry-After``)."""
        try:
            target, headers, extensions = await pinned_target(
                d.url, allow_private=self.allow_private, resolve=self._resolve
            )
        except UrlRefused as e:
            return _Outcome.GIVE_UP, f"URL refused: {e}", None
        except InputFetchError as e:  # a name that does not resolve now may resolve later
            return _Outcome.RETRY, str(e), None
        headers.update(self._headers(d))
        try:
            resp = await self._client.post(target, content=d.body, headers=headers, extensions=extensions)
        except httpx.HTTPError as e:
            return _Outcome.RETRY, f"{type(e).__name__}: {e}", None
        code = resp.status_code
        if 200 <= code < 300:
            return _Outcome.DELIVERED, str(code), None
        if code == 429 or code >= 500:
            return _Outcome.RETRY, f"HTTP {code}", retry_after_s(resp.headers.get("retry-after"))
        return _Outcome.GIVE_UP, f"HTTP {code}", None

    def _headers(self, d: _Delivery) -> dict[str, str]:
        now = int(time.time())
        timestamp = str(now)
        headers = {
            "Content-Type": "application/json",
            "X-Sdfleet-Event": d.event.value,
            "X-Sdfleet-Delivery": d.id,
            "X-Sdfleet-Timestamp": timestamp,
            "webhook-id": d.id,
            "webhook-timestamp": timestamp,
        }
        if self._standard is not None:
            at = datetime.datetime.fromtimestamp(now, datetime.UTC)
            headers["webhook-signature"] = self._standard.sign(d.id, at, d.body.decode())
            headers["X-Sdfleet-Signature"] = sign(self.secret, timestamp, d.body)
        return headers

    async def aclose(self) -> None:
        """Wait up to ``drain_s`` for deliveries in flight, cancel the rest (logged), close the client."""
        self._closed = True
        pending = set(self._jobs)
        if pending:
            log.info("waiting up to %.0f s for %d webhook deliveries", self.drain_s, len(pending))
            _, late = await asyncio.wait(pending, timeout=self.drain_s)
            for job in late:
                log.warning("webhook %s given up: shutting down", self._jobs.get(job, "?"))
                job.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> WebhookNotifier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
