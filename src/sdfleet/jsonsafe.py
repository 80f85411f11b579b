"""JSON from outside, parsed within one nesting limit.

Request bodies and messages from other producers are client-controlled. The stdlib parser raises
``RecursionError`` near 1,000 levels, and pydantic reads stored records back with a JSON recursion
limit of 200: a body accepted at 199 levels became a record that no agent and no API could read.
Every such JSON is therefore parsed here and refused past ``MAX_DEPTH`` levels, far below both.

The same parse refuses what JSON's grammar allows but a record cannot hold as sent (each once a
500 or a silently changed record): a number out of a float's range (``1e400`` reads as infinity
and is written back as ``null``), an integer past Python's conversion limit (4,300 digits), a lone
UTF-16 surrogate escape (``"\\ud800"``, which no UTF-8 encoder writes back), and bytes that are not
UTF-8 (RFC 8259 §8.1: JSON between systems is UTF-8; ``json.loads`` would also guess UTF-16/32).
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

from sdfleet.errors import ValidationFailed

MAX_DEPTH = 64
"""Deepest nesting of objects and arrays accepted in a request body or a foreign message."""


class JsonTooDeep(ValidationFailed):
    code = "json_too_deep"


class Unrepresentable(json.JSONDecodeError):
    """JSON (or nearly) whose value would not survive being stored and read back."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg, "", 0)
        self.args = (msg,)  # no "line 1 column 1": the hooks that raise it do not know where


def loads(data: bytes | bytearray | str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that raises ``JsonTooDeep`` past ``max_depth`` levels, ``UnicodeDecodeError``
    for bytes that are not UTF-8, and ``json.JSONDecodeError`` for malformed JSON and for values
    a record cannot hold (``Unrepresentable``)."""
    text = bytes(data).decode("utf-8") if isinstance(data, bytes | bytearray) else data
    try:
        value = json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except RecursionError as e:
        raise JsonTooDeep(f"JSON nested too deeply; at most {max_depth} levels") from e
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise Unrepresentable(f"integer out of range (over {sys.get_int_max_str_digits()} digits)") from e
    depth = nesting(value)
    if depth > max_depth:
        raise JsonTooDeep(f"JSON nested {depth} levels deep; at most {max_depth}")
    if _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(value)
    return value


def _not_json(name: str) -> Any:
    # json.loads takes NaN and Infinity, which JSON has not: a record holding one reads back changed
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def _finite(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise Unrepresentable(f"number {literal[:32]}{'…' if len(literal) > 32 else ''} is out of range")
    return value


# Only an escape makes a surrogate (strict UTF-8 decoding refuses encoded ones); a valid pair is
# joined into one character by the parser, so one left in a parsed string is lone.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_lone_surrogates(value: Any) -> None:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and _SURROGATE.search(node):
            raise Unrepresentable("string holds a lone UTF-16 surrogate escape (\\ud800–\\udfff)")


def nesting(value: Any) -> int:
    """Levels of objects and arrays in a parsed JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children if isinstance(child, dict | list))
    return deepest
