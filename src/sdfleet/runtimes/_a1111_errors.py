"""SD WebUI's error answers → ``Reject`` (fails once, in SD WebUI's words) or ``RuntimeFailure`` (retried).

SD WebUI answers many client mistakes with 500: its own refusals are ``HTTPException`` ("Invalid
encoded image", "Request to local resource not allowed"), input checks are ``AssertionError``
("could not find upscaler named X"), an unknown model on ``/options`` is ``RuntimeError("model 'x'
not found")``, a picture that overflowed its precision is ``NansException`` (the same request on
the same server configuration overflows again: seed and prompt fix the computation; the words
say which server option to change). Its body names the exception (``{"error", "detail", "body",
"errors"}``), so the error is classified by what it says: the same request would fail the same way
again. What cannot be told apart from a passing fault (out of memory, a proxy's 502, a body that
is not SD WebUI's) stays retryable.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from sdfleet.errors import Reject, RuntimeFailure

# Exception types SD WebUI raises for the request itself, never for the machine's state.
_DETERMINISTIC = frozenset(
    {
        "HTTPException",
        "AssertionError",
        "ValueError",
        "TypeError",
        "KeyError",
        "IndexError",
        "ZeroDivisionError",
        "NansException",
        "OverflowError",  # prompt editing at an infinite step, "[a:b:1e999]"
        "RecursionError",  # brackets nested past its prompt reader's depth
    }
)
# RuntimeErrors whose message says the request can never succeed.
_DETERMINISTIC_RUNTIME = (
    (re.compile(r"model '.*' not found"), "unknown_model"),
    (re.compile(r"Kernel size can't be greater than actual input size"), "invalid_params"),
)
_CODES = (
    ("Invalid encoded image", "invalid_image"),
    ("Invalid image url", "invalid_image"),
    ("local resource", "url_refused"),
    ("Requests not allowed", "url_refused"),
    ("could not find upscaler", "unknown_upscaler"),
    ("tensor with NaNs", "nan_output"),
    ("not found", "not_found"),
)
_RETRY_4XX = frozenset({408, 425, 429})


def _body(resp: httpx.Response) -> dict[str, Any] | None:
    try:
        body = resp.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def words(resp: httpx.Response) -> str:
    """SD WebUI's own words: ``detail`` and ``errors`` of its error body, else the text."""
    body = _body(resp)
    if body is None:
        return resp.text[:500]
    parts = [body.get("detail"), body.get("errors")]
    text = "; ".join(p if isinstance(p, str) else json.dumps(p) for p in parts if p)
    return text[:500] or str(body.get("error", ""))[:500]


def _code(text: str, default: str) -> str:
    for pattern, code in _DETERMINISTIC_RUNTIME:
        if pattern.search(text):
            return code
    return next((code for needle, code in _CODES if needle in text), default)


def _deterministic(error: str, text: str) -> str | None:
    """The Reject code for an error SD WebUI will answer the same way again, else None."""
    if error in _DETERMINISTIC:
        return _code(text, "rejected")
    if error == "RuntimeError":
        return next((code for pattern, code in _DETERMINISTIC_RUNTIME if pattern.search(text)), None)
    return None


def classify(path: str, resp: httpx.Response) -> Reject | RuntimeFailure:
    """The error for a non-2xx answer to ``path``."""
    status, text = resp.status_code, words(resp)
    body = _body(resp) or {}
    error = str(body.get("error", ""))
    label = f"{status} {error}".strip()
    if 400 <= status < 500 and status not in _RETRY_4XX:
        return Reject(f"SD WebUI refused {path} ({label}): {text}", code=_code(text, "rejected"))
    code = _deterministic(error, text) if status >= 500 else None
    if code is not None:
        return Reject(f"SD WebUI refused {path} ({label}): {text}", code=code)
    return RuntimeFailure(f"SD WebUI {path} failed ({label}): {text}")
