"""JSON from outside, parsed within one nesting limit.

Request bodies and messages from other producers are client-controlled. The stdlib parser raises
``RecursionError`` near 1,000 levels, and pydantic reads stored records back with a JSON recursion
limit of 200: a body accepted at 199 levels became a record that no agent and no API could read.
Every such JSON is therefore parsed here and refused past ``MAX_DEPTH`` levels, far below both.
"""

from __future__ import annotations

import json
from typing import Any

from sdfleet.errors import ValidationFailed

MAX_DEPTH = 64
"""Deepest nesting of objects and arrays accepted in a request body or a foreign message."""


class JsonTooDeep(ValidationFailed):
    code = "json_too_deep"


def loads(data: bytes | bytearray | str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that raises ``JsonTooDeep`` past ``max_depth`` levels (``ValueError`` as
    ``json.loads`` does for malformed JSON)."""
    try:
        value = json.loads(data, parse_constant=_not_json)
    except RecursionError as e:
        raise JsonTooDeep(f"JSON nested too deeply; at most {max_depth} levels") from e
    depth = nesting(value)
    if depth > max_depth:
        raise JsonTooDeep(f"JSON nested {depth} levels deep; at most {max_depth}")
    return value


def _not_json(name: str) -> Any:
    # json.loads takes NaN and Infinity, which JSON has not: a record holding one reads back changed
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


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
