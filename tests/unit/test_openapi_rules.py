"""The OpenAPI document's rules say what the server's own checks accept (schemathesis holds the
server to the document: a body the schema allows must not be refused)."""

from __future__ import annotations

import re
import sys

from sdfleet.api.openapi_rules import NON_BLANK


def test_non_blank_is_what_str_strip_leaves_something_of() -> None:
    """``check_task`` refuses a prompt that ``str.strip`` empties; ECMA's ``\\S`` let U+001D through."""
    pattern = re.compile(NON_BLANK["pattern"])
    disagree = [
        hex(i)
        for i in range(sys.maxunicode + 1)
        if not 0xD800 <= i < 0xE000 and bool(pattern.search(chr(i))) == chr(i).isspace()
    ]
    assert disagree == []
