"""What ``jsonsafe.loads`` takes and refuses: JSON whose value survives being stored and read back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sdfleet import jsonsafe
from sdfleet.errors import MessageDecodeError
from sdfleet.messages import decode_task

REFUSED = [
    (b'{"a":1e400}', json.JSONDecodeError, "1e400 is out of range"),
    (b'{"a":-2E+999}', json.JSONDecodeError, "out of range"),
    (b'{"a":' + b"7" * 5000 + b"}", json.JSONDecodeError, "integer out of range"),
    (b'{"a":"\\ud800"}', json.JSONDecodeError, "lone UTF-16 surrogate"),
    (b'{"\\uDC00":1}', json.JSONDecodeError, "lone UTF-16 surrogate"),
    (b'["\\ude00\\ud83d"]', json.JSONDecodeError, "lone UTF-16 surrogate"),  # a pair in the wrong order
    (b"[NaN]", json.JSONDecodeError, "NaN is not JSON"),
    (b"[-Infinity]", json.JSONDecodeError, "Infinity is not JSON"),
    ('{"a":"x"}'.encode("utf-16"), UnicodeDecodeError, "utf-8"),
    ('{"a":"x"}'.encode("utf-32-le"), json.JSONDecodeError, "Expecting property name"),  # NULs between
    (b'\xef\xbb\xbf{"a":1}', json.JSONDecodeError, "BOM"),
    (b'{"a":"\xed\xa0\x80"}', UnicodeDecodeError, "utf-8"),  # a surrogate encoded as UTF-8 bytes
]


@pytest.mark.parametrize(("raw", "error", "words"), REFUSED, ids=[repr(r[:24]) for r, _, _ in REFUSED])
def test_refused(raw: bytes, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        jsonsafe.loads(raw)


ACCEPTED: list[tuple[bytes | str, Any]] = [
    (b'{"a":"\\ud83d\\ude00"}', {"a": "😀"}),  # a valid pair is one character
    ('{"a":"😀"}'.encode(), {"a": "😀"}),
    (b'{"a":"\\\\ud800"}', {"a": "\\ud800"}),  # an escaped backslash, then text
    (b'{"a":1.7976931348623157e308,"b":-5e-324}', {"a": 1.7976931348623157e308, "b": -5e-324}),
    (b'{"a":' + b"9" * 4300 + b"}", {"a": int("9" * 4300)}),
    ('{"a": [1, 2.5, "ü"]}', {"a": [1, 2.5, "ü"]}),
]


@pytest.mark.parametrize(("raw", "value"), ACCEPTED, ids=[repr(r[:24]) for r, _ in ACCEPTED])
def test_accepted_and_round_trips(raw: bytes | str, value: Any) -> None:
    parsed = jsonsafe.loads(raw)
    assert parsed == value
    assert json.loads(json.dumps(parsed, ensure_ascii=False).encode("utf-8")) == value


def test_a_foreign_message_with_an_unrepresentable_value_is_undecodable() -> None:
    """The agent sends it to the dead-letter queue instead of failing somewhere later."""
    for raw in (b'{"schema":1,"params":{"prompt":"x"},"context":1e999}', b'{"prompt":"\\udfff"}'):
        with pytest.raises(MessageDecodeError, match="not JSON"):
            decode_task(raw, {})
