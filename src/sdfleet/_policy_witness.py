"""An example message that two filter policies both accept, for ``sdfleet.disjoint``'s errors."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import Any

from sdfleet._policy_algebra import Branch, Inexpressible, Path, dnf
from sdfleet._policy_validate import Scope, is_number
from sdfleet.policy import matches

_OMIT = object()  # the key is left out of the message


def example_message(
    a: Mapping[str, Any] | None, scope_a: Scope, b: Mapping[str, Any] | None, scope_b: Scope
) -> str | None:
    """``attributes {...}`` or ``body {...}`` that both policies accept, checked with
    ``policy.matches``; None when none is found."""
    try:
        forms_a, forms_b = _forms(a), _forms(b)
    except Inexpressible:
        return None
    if a is not None and b is not None and scope_a != scope_b:
        one, other = _first(forms_a, [{}], [a], scope_a), _first(forms_b, [{}], [b], scope_b)
        return None if one is None or other is None else f"{one} and {other}"
    scope = scope_a if a is not None else scope_b
    return _first(forms_a, forms_b, [p for p in (a, b) if p is not None], scope)


def _forms(policy: Mapping[str, Any] | None) -> list[Branch]:
    return [{}] if policy is None else dnf(policy)


def _first(
    forms_a: list[Branch], forms_b: list[Branch], policies: list[Mapping[str, Any]], scope: Scope
) -> str | None:
    for x in forms_a:
        for y in forms_b:
            message = _pick(x, y)
            if message is None:
                continue
            doc = _nest(message) if scope == "MessageBody" else {k[0]: v for k, v in message.items()}
            if all(_accepted(p, doc, scope) for p in policies):
                where = "body" if scope == "MessageBody" else "attributes"
                return f"{where} {json.dumps(doc, sort_keys=True)}"
    return None


def _accepted(policy: Mapping[str, Any], doc: dict[str, Any], scope: Scope) -> bool:
    if scope == "MessageBody":
        return matches(policy, body=doc, scope="MessageBody")
    return matches(policy, attributes=doc)


def _pick(x: Branch, y: Branch) -> dict[Path, Any] | None:
    out: dict[Path, Any] = {}
    for path in {**x, **y}:
        conds = [c for c in (x.get(path), y.get(path)) if c is not None]
        candidates = [s for c in conds for rule in c for s in _samples(rule)] + _affixed(conds)
        chosen = next((v for v in candidates if all(_meets(c, v) for c in conds)), None)
        if chosen is None:
            return None
        if chosen is not _OMIT:
            out[path] = chosen
    return out


def _affixed(conds: list[list[Any]]) -> list[str]:
    """One string meeting a prefix and a suffix rule at once."""
    rules = [r for c in conds for r in c if isinstance(r, Mapping)]
    prefixes = [r["prefix"] for r in rules if "prefix" in r] or [""]
    suffixes = [r["suffix"] for r in rules if "suffix" in r] or [""]
    return [f"{p}x{s}" for p in prefixes for s in suffixes]


def _meets(cond: list[Any], value: Any) -> bool:
    body = {"_": 0} if value is _OMIT else {"k": value}
    return matches({"k": cond}, body=body, scope="MessageBody")


def _samples(rule: Any) -> list[Any]:
    if not isinstance(rule, Mapping):
        return [rule]
    ((op, arg),) = rule.items()
    if op == "exists":
        return ["x"] if arg else [_OMIT]
    if op == "anything-but":
        values = arg if isinstance(arg, list) else [arg]
        if values and all(is_number(v) for v in values):
            return [max(values) + 1]
        return ["other", "x", "zz-other"]
    if op in ("prefix", "suffix"):
        return [f"{arg}x" if op == "prefix" else f"x{arg}"]
    if op == "equals-ignore-case":
        return [arg if isinstance(arg, str) else arg[0]]
    if op == "wildcard":
        return [arg.replace("\\*", "\0").replace("*", "x").replace("\0", "*").replace("\\\\", "\\")]
    if op == "cidr":
        return [str(ipaddress.ip_network(arg, strict=False).network_address)]
    if op == "numeric":
        return [_number_in(arg)]
    return []


def _number_in(spec: list[Any]) -> float:
    bounds = dict(zip(spec[::2], spec[1::2], strict=True))
    if "=" in bounds:
        return float(bounds["="])
    low = bounds.get(">=", bounds.get(">"))
    high = bounds.get("<=", bounds.get("<"))
    if low is not None and high is not None:
        return (float(low) + float(high)) / 2
    if low is not None:
        return float(low) + 1
    return float(high if high is not None else 0) - 1


def _nest(message: dict[Path, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for path, value in message.items():
        node = doc
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return doc
