"""The one exception tree of sdfleet.

Callers never catch a dependency's exception types: each backend translates them at its boundary
(``map_errors()`` context managers) and raises one of these, ``from`` the original.

    SdfleetError
    ├── ConfigError                  bad settings or fleet config; missing optional extra
    ├── ValidationFailed             a request the client can fix (HTTP 400/413/422)
    │   ├── PayloadTooLarge
    │   ├── UnsupportedMediaType     a body we do not read (Content-Encoding) (HTTP 415)
    │   └── RequestTimeout           a body not sent within api.body_timeout_s (HTTP 408)
    ├── NotFound                     unknown task, file, model or queue (HTTP 404)
    ├── Conflict                     idempotency-key clash, illegal transition (HTTP 409)
    │   └── TransitionConflict
    │       └── TakenOver            another agent runs the task now (this agent's lease lapsed)
    ├── Unauthorized                 missing or unknown API key (HTTP 401)
    ├── Forbidden                    a valid key asking for more than its tenant may (HTTP 403)
    ├── RateLimited                  a tenant's rate or in-flight limit (HTTP 429 + Retry-After)
    ├── BusError
    │   ├── BusUnavailable           engine unreachable (HTTP 503)
    │   └── MessageDecodeError       a message no agent can understand (goes to the DLQ)
    ├── StoreError
    │   └── StoreUnavailable
    ├── StorageError
    │   ├── StorageUnavailable
    │   ├── ChecksumMismatch         a transferred file differs from its checksum (never kept)
    │   └── DiskFull                 no room for a model (the disk, or models.disk_budget_gb)
    ├── InputFetchError              an input URL refused or unreadable (task fails, no retry)
    │   ├── InputUnavailable         not now: a timeout, HTTP 503, throttling (task retries)
    │   └── UrlRefused               the SSRF guard said no
    └── RuntimeFailure               the runtime could not produce images (task retries)
        ├── ModelLoadError
        ├── GenerationTimeout
        └── Interrupted              cancelled or shut down mid-run

Control flow (not errors): ``Reject(reason)`` fails a task at once without retrying; any
``SdfleetError`` from a run is a failed attempt, retried up to ``retry.max_receives``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pydantic import ValidationError


class SdfleetError(Exception):
    """Root of every error sdfleet raises on purpose."""

    code = "internal"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(SdfleetError):
    code = "config_error"


class ValidationFailed(SdfleetError):
    code = "invalid_request"


class PayloadTooLarge(ValidationFailed):
    code = "payload_too_large"


class UnsupportedMediaType(ValidationFailed):
    code = "unsupported_media_type"


class RequestTimeout(ValidationFailed):
    code = "request_timeout"


class NotFound(SdfleetError):
    code = "not_found"


class Conflict(SdfleetError):
    code = "conflict"


class TransitionConflict(Conflict):
    code = "transition_conflict"


class TakenOver(TransitionConflict):
    """The record says another agent runs the task: this agent's delivery lease lapsed (its event
    loop stalled past it, the engine was away) and the other received the message again. This
    agent's outcome is not written and its stale delivery is left alone: the result and the
    message are the other's."""

    code = "taken_over"


class Unauthorized(SdfleetError):
    code = "unauthorized"


class Forbidden(SdfleetError):
    code = "forbidden"


class RateLimited(SdfleetError):
    """Over a tenant's ``rate_limit`` or ``max_in_flight``; ``retry_after_s`` is when to retry."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class BusError(SdfleetError):
    code = "bus_error"


class BusUnavailable(BusError):
    code = "bus_unavailable"


class MessageDecodeError(BusError):
    code = "message_decode_error"


class StoreError(SdfleetError):
    code = "store_error"


class StoreUnavailable(StoreError):
    code = "store_unavailable"


class StorageError(SdfleetError):
    code = "storage_error"


class StorageUnavailable(StorageError):
    code = "storage_unavailable"


class ChecksumMismatch(StorageError):
    code = "checksum_mismatch"


class DiskFull(StorageError):
    code = "disk_full"


class InputFetchError(SdfleetError):
    code = "input_fetch_failed"


class InputUnavailable(InputFetchError):
    """The input could not be had just now (a timeout, a connection error, an HTTP status in
    ``guarded_http.RETRY_STATUSES``, S3 throttling or a 5xx): the agent retries the task, as a
    failed attempt, rather than failing it; ``retry_after_s``: the wait the server asked for."""

    def __init__(
        self, message: str = "", *, code: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class UrlRefused(InputFetchError):
    code = "url_refused"


class RuntimeFailure(SdfleetError):
    code = "runtime_failure"


class ModelLoadError(RuntimeFailure):
    code = "model_load_error"


class GenerationTimeout(RuntimeFailure):
    code = "timeout"


class Interrupted(RuntimeFailure):
    code = "interrupted"


class Reject(Exception):
    """Fail the task now; retrying cannot help."""

    def __init__(self, reason: str, code: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(map(str, loc))


_MEMBER = re.compile(r"^(str|int|float|bool|none|list|dict|[a-z-]+\[.*\])$")
"""How pydantic names the member of a union in an error's location (``str``,
``function-before[integral(), int]``): its internals, not a place in the input."""


class _Invalid(Protocol):
    """pydantic's ``ValidationError``, or FastAPI's ``RequestValidationError`` (its query and path)."""

    def errors(self) -> Sequence[Any]: ...


def validation_errors(
    e: _Invalid, where: Callable[[tuple[int | str, ...]], str] = _dotted, whole: str = ""
) -> str:
    """One line: each offending place once (``queues.0.name``, or as ``where`` names it; a union's
    members' errors as one), what is wrong, and what was given when it is short; the first five.
    A model's own check has no field: ``whole`` names the place (``body``), or none is named.
    A ``ValueError`` of ours says what it refused: its words alone, without pydantic's
    ``Value error,`` nor the input again."""
    places: dict[tuple[int | str, ...], list[Any]] = {}
    for err in e.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _MEMBER.match(p)))
        places.setdefault(loc, []).append(err)
    parts = []
    for loc, errs in list(places.items())[:5]:
        msgs = list(dict.fromkeys(_message(err) for err in errs))
        msg = (
            msgs[0]
            if len(msgs) == 1
            else "Input should be " + " or ".join(m.removeprefix("Input should be ") for m in msgs)
        )
        got = "" if errs[0]["type"] == "value_error" else _got(errs[0].get("input"))
        place = where(loc) if loc else whole
        parts.append(f"{place}: {msg}{got}" if place else f"{msg}{got}")
    return "; ".join(parts)


_PATTERN_WORDS: dict[str, str] = {}


def worded(pattern: str, words: str) -> str:
    """``pattern``, registered with what it takes in words: a value it refuses is said as
    ``String should be <words>``, never as the regular expression (which clients of the API and
    users of the CLI would otherwise read, up to 600 characters of it)."""
    _PATTERN_WORDS[pattern] = words
    return pattern


def pattern_words(pattern: str) -> str | None:
    """What ``worded`` registered for ``pattern``."""
    return _PATTERN_WORDS.get(pattern)


def _message(err: Any) -> str:
    msg: str = err["msg"]
    if err["type"] == "string_pattern_mismatch":
        words = _PATTERN_WORDS.get(err.get("ctx", {}).get("pattern", ""))
        return f"String should be {words}" if words else msg
    return msg.removeprefix("Value error, ") if err["type"] == "value_error" else msg


def _got(value: Any) -> str:
    """The offending value, when it is short enough to quote (one sees what one sent)."""
    if isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 64):
        return f" (got {value!r})"
    return ""


def cannot_read(what: str, path: object, e: BaseException) -> ConfigError:
    """``cannot read <what> <path>: <why>``, an OS error in its own words without the path again
    (``[Errno 2] No such file or directory: '<path>'`` named it twice), any other as ``one_line``."""
    why = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)
    return ConfigError(f"cannot read {what} {path}: {why}")


def one_line(e: BaseException) -> str:
    """An exception's message on one line, as a person reads it after ``error:`` and as an error's
    message carries it: pydantic's as ``validation_errors`` gives it, PyYAML's (several lines, the
    offending one drawn under them) as ``line L, column C: problem (context)``, any other message's
    lines joined."""
    if isinstance(e, ValidationError):
        return validation_errors(e)
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if isinstance(problem, str) and mark is not None:  # yaml.MarkedYAMLError (errors.py imports no yaml)
        context = getattr(e, "context", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"{where}: {problem} ({context})" if context else f"{where}: {problem}"
    return " ".join(str(e).split())


def input_failure(e: InputFetchError) -> InputUnavailable | Reject:
    """What a runtime raises for an input it could not fetch (a URL inside a request or a
    workflow): ``InputUnavailable`` as it is when the input may come back (a failed attempt,
    retried after a backoff like the agent's own input fetches), else a ``Reject``."""
    if isinstance(e, InputUnavailable):
        return e
    return Reject(e.message or str(e), code=e.code)
