"""What the real SD WebUI v1.10.1 answered, call by call (tests/data/sdwebui-1.10.1.json, captured
from it on CPU with ``--api --nowebui``), and a field-by-field comparison with those answers.

A shape is how the capture wrote an answer down: a dict of shapes, a list ``[element shape,
"len=N"]`` (``["empty"]`` for an empty list), or a type name: ``str`` (``str(b64? …)`` for an
image), ``int``, ``float``, ``bool``, ``null``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_DATA = Path(__file__).resolve().parent.parent / "data" / "sdwebui-1.10.1.json"
CALLS: dict[str, dict[str, Any]] = json.loads(_DATA.read_text())["calls"]
PROGRESS_RUNNING: dict[str, Any] = json.loads(_DATA.read_text())["progress_snapshot"]

_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (float,), "bool": (bool,)}


def _scalar(actual: Any, shape: str, path: str) -> list[str]:
    name = shape.split("(", 1)[0]
    if name == "null":
        return [] if actual is None else [f"{path}: {type(actual).__name__} where SD WebUI sends null"]
    types = _TYPES.get(name)
    if types is None:
        return [f"{path}: unknown shape {shape!r}"]
    if (isinstance(actual, bool) and name != "bool") or not isinstance(actual, types):
        return [f"{path}: {type(actual).__name__} where SD WebUI sends {name}"]
    return []


def mismatches(actual: Any, shape: Any, path: str = "", *, exact: bool = True) -> list[str]:
    """Every place ``actual`` differs from SD WebUI's ``shape``: a field it sends that is missing,
    a type that differs, and (``exact``) a field SD WebUI does not send."""
    if isinstance(shape, dict):
        if not isinstance(actual, dict):
            return [f"{path}: {type(actual).__name__} where SD WebUI sends an object"]
        out = [f"{path}.{k}: missing" for k in shape if k not in actual]
        if exact:
            out += [f"{path}.{k}: not sent by SD WebUI" for k in actual if k not in shape]
        for key in shape:
            if key in actual:
                out += mismatches(actual[key], shape[key], f"{path}.{key}", exact=exact)
        return out
    if isinstance(shape, list):
        if not isinstance(actual, list):
            return [f"{path}: {type(actual).__name__} where SD WebUI sends a list"]
        if not shape or shape[0] == "empty":
            return []
        return [
            m
            for i, item in enumerate(actual)
            for m in mismatches(item, shape[0], f"{path}[{i}]", exact=exact)
        ]
    return _scalar(actual, str(shape), path)
