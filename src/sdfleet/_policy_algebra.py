"""Algebra of SNS filter conditions for ``sdfleet.disjoint``: policies as ORed conjunctions
(``dnf``), ``AND`` of two conjunctions (``conjoin``) and ``NOT`` of one key's condition (``negate``).

A rule's meaning is always the one ``sdfleet.policy.matches`` gives it; where two rules on one key
cannot be merged into rules SNS accepts, ``Inexpressible`` is raised.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sdfleet._policy_validate import OR_KEY, is_number
from sdfleet.policy import matches

Path = tuple[str, ...]
Branch = dict[Path, list[Any]]
"""One conjunction: key path → the rules (ORed) its value must meet."""

ABSENT: dict[str, Any] = {"exists": False}
_STRING_OPS = ("prefix", "suffix", "equals-ignore-case", "wildcard")


class Inexpressible(Exception):
    """SNS's filter language cannot say this."""


def dnf(policy: Mapping[str, Any], prefix: Path = ()) -> list[Branch]:
    """The policy as ORed conjunctions; contradictory ones dropped."""
    branches: list[Branch] = [{}]
    for key, cond in policy.items():
        if key == OR_KEY:
            sub = [b for branch in cond for b in dnf(branch, prefix)]
        elif isinstance(cond, Mapping):
            sub = dnf(cond, (*prefix, key))
        else:
            sub = [{(*prefix, key): list(cond)}]
        branches = [m for a in branches for b in sub if (m := conjoin(a, b)) is not None]
    return branches


def conjoin(a: Branch, b: Branch) -> Branch | None:
    """``a AND b``; None when they contradict. Raises ``Inexpressible``."""
    out = dict(a)
    for path, cond in b.items():
        merged = intersect(out[path], cond) if path in out else cond
        if not merged:
            return None
        out[path] = merged
    return out


def overlaps(a: list[Branch], b: list[Branch], *, same_scope: bool) -> bool:
    """Whether some message may meet both (True where it cannot be told)."""
    if not same_scope:
        return bool(a and b)
    for x in a:
        for y in b:
            try:
                if conjoin(x, y) is not None:
                    return True
            except Inexpressible:
                return True  # cannot tell: assume they overlap
    return False


# -- one key ---------------------------------------------------------------------------------------


def intersect(a: list[Any], b: list[Any]) -> list[Any]:
    """Rules a value meets exactly when it meets both conditions ([]: none does)."""
    out: list[Any] = []
    for x in a:
        for y in b:
            for rule in _and_rule(x, y):
                if rule not in out:
                    out.append(rule)
    return out


def _op(rule: Any) -> str | None:
    return next(iter(rule)) if isinstance(rule, Mapping) else None


def _and_rule(x: Any, y: Any) -> list[Any]:
    """Rules meeting both ``x`` and ``y`` on one key: [] for none, [rule] for one."""
    if x == y:
        return [x]
    if _op(x) is None or _op(y) is None:
        value, rule = (x, y) if _op(x) is None else (y, x)
        return [value] if accepts(rule, value) else []
    if ABSENT in (x, y):
        return []
    if {"exists": True} in (x, y):
        return [y if x == {"exists": True} else x]
    return _and_operators(x, y)


def accepts(rule: Any, value: Any) -> bool:
    """Whether one key holding ``value`` meets ``rule`` (``policy.matches``'s meaning)."""
    return matches({"k": [rule]}, body={"k": value}, scope="MessageBody")


def _and_operators(x: Mapping[str, Any], y: Mapping[str, Any]) -> list[Any]:
    ox, oy = _op(x), _op(y)
    px, py = _plain_list(x), _plain_list(y)
    if px is not None and py is not None:
        values = [*px, *(v for v in py if v not in px)]
        if all(isinstance(v, str) for v in values) or all(is_number(v) for v in values):
            return [{"anything-but": values}]
    numeric = _and_numeric(x, y)
    if numeric is not None:
        return numeric
    for a, b in ((x, y), (y, x)):
        excluded = _plain_list(a)
        if excluded is not None and not any(accepts(b, v) for v in excluded):
            return [b]  # b already keeps every excluded value out
    for a, b in ((x, y), (y, x)):
        inner = a.get("anything-but")
        if isinstance(inner, Mapping) and _op(inner) == _op(b) and _op(b) in ("prefix", "suffix"):
            return _affix_without(b, inner)
    if ox is not None and ox == oy and ox in ("prefix", "suffix"):
        p, q = x[ox], y[ox]
        starts = str.startswith if ox == "prefix" else str.endswith
        return [x] if starts(p, q) else [y] if starts(q, p) else []
    raise Inexpressible(f"SNS cannot require both {json.dumps(x)} and {json.dumps(y)} of one key")


def _affix_without(keep: Mapping[str, Any], drop: Mapping[str, Any]) -> list[Any]:
    """Strings with affix ``keep`` but not affix ``drop`` (both prefix, or both suffix)."""
    op = _op(keep)
    assert op is not None
    k, d = keep[op], drop[op]
    has = str.startswith if op == "prefix" else str.endswith
    if has(k, d):
        return []  # every string with k has d too
    if has(d, k):
        raise Inexpressible(f"SNS cannot require both {json.dumps(keep)} and not {json.dumps(drop)}")
    return [dict(keep)]


def _plain_list(rule: Mapping[str, Any]) -> list[Any] | None:
    """The values of an ``anything-but`` list (or single value); None for anything else."""
    if _op(rule) != "anything-but" or isinstance(rule["anything-but"], Mapping):
        return None
    arg = rule["anything-but"]
    return list(arg) if isinstance(arg, list) else [arg]


def negate(cond: list[Any], *, number: bool = False) -> list[Any]:
    """``NOT (r1 OR r2 ...)`` on one key, as one condition. Raises ``Inexpressible``.

    ``number``: the key holds a number whenever it is present (a ``NUMBER_ATTRIBUTES`` attribute,
    which every engine refuses to publish otherwise), so NOT of a ``numeric`` range is absence or
    the ranges around it; of another key it cannot be said (NOT takes its strings too)."""
    out: list[Any] | None = None
    for rule in cond:
        neg = _negate_rule(rule, number=number)
        out = neg if out is None else intersect(out, neg)
    return out or []


def _negate_rule(rule: Any, *, number: bool = False) -> list[Any]:
    op = _op(rule)
    if op == "numeric" and number:
        return [ABSENT, *_numeric_outside(_interval(rule["numeric"]))]
    if op is None:
        if isinstance(rule, str) or is_number(rule):
            return [ABSENT, {"anything-but": [rule]}]
        raise Inexpressible(f"anything-but cannot exclude {json.dumps(rule)}")
    arg = rule[op]
    if op == "exists":
        return [{"exists": not arg}]
    if op == "anything-but":
        if isinstance(arg, Mapping):
            return [ABSENT, dict(arg)]
        return [ABSENT, *(arg if isinstance(arg, list) else [arg])]
    if op in _STRING_OPS:
        return [ABSENT, {"anything-but": {op: arg}}]
    raise Inexpressible(f"SNS has no negation of {json.dumps(rule)}")


# -- numeric ranges --------------------------------------------------------------------------------

Interval = tuple[float, bool, float, bool]
"""low, low included, high, high included (``-inf``/``inf`` where there is no bound)."""
_INF = float("inf")


def _interval(arg: list[Any]) -> Interval:
    lo, lo_in, hi, hi_in = -_INF, False, _INF, False
    for op, bound in zip(arg[::2], arg[1::2], strict=True):
        if op in ("=", ">", ">="):
            lo, lo_in = bound, op != ">"
        if op in ("=", "<", "<="):
            hi, hi_in = bound, op != "<"
    return lo, lo_in, hi, hi_in


def _numeric_rule(iv: Interval) -> list[Any]:
    """The ``numeric`` rule for a range ([] when it holds no number)."""
    lo, lo_in, hi, hi_in = iv
    if lo > hi or (lo == hi and not (lo_in and hi_in)):
        return []
    if lo == hi:
        return [{"numeric": ["=", lo]}]
    arg: list[Any] = []
    if lo > -_INF:
        arg += [">=" if lo_in else ">", lo]
    if hi < _INF:
        arg += ["<=" if hi_in else "<", hi]
    return [{"numeric": arg}]


def _and_numeric(x: Mapping[str, Any], y: Mapping[str, Any]) -> list[Any] | None:
    """A ``numeric`` range AND another range, or AND ``anything-but`` numbers; None for other pairs."""
    for a, b in ((x, y), (y, x)):
        if _op(b) != "numeric":
            continue
        if _op(a) == "numeric":
            return _numeric_and(a["numeric"], b["numeric"])
        excluded = _plain_list(a)
        if excluded is not None and all(is_number(v) for v in excluded):
            return _numeric_without(_interval(b["numeric"]), excluded)
    return None


def _numeric_and(x: list[Any], y: list[Any]) -> list[Any]:
    (alo, alo_in, ahi, ahi_in), (blo, blo_in, bhi, bhi_in) = _interval(x), _interval(y)
    lo, lo_in = max((alo, not alo_in), (blo, not blo_in))
    hi, hi_in = min((ahi, ahi_in), (bhi, bhi_in))
    return _numeric_rule((lo, not lo_in, hi, hi_in))


def _numeric_outside(iv: Interval) -> list[Any]:
    """Numbers outside a range: the range below it and the one above."""
    lo, lo_in, hi, hi_in = iv
    return [*_numeric_rule((-_INF, False, lo, not lo_in)), *_numeric_rule((hi, not hi_in, _INF, False))]


def _numeric_without(iv: Interval, excluded: list[Any]) -> list[Any]:
    """Numbers of a range but the excluded ones: the ranges between them."""
    parts = [iv]
    for v in excluded:
        split: list[Interval] = []
        for lo, lo_in, hi, hi_in in parts:
            if lo <= v <= hi:
                split += [(lo, lo_in, v, False), (v, False, hi, hi_in)]
            else:
                split.append((lo, lo_in, hi, hi_in))
        parts = split
    return [rule for part in parts for rule in _numeric_rule(part)]
