"""Validation of SNS filter policies; the public face is ``sdfleet.policy.validate``.

Rules and messages follow the Amazon SNS developer guide ("Filter policy constraints in Amazon
SNS") and aws/event-ruler's ``JsonRuleCompiler``, which SNS filtering is built on.
"""

from __future__ import annotations

import ipaddress
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeAlias

Scope: TypeAlias = Literal["MessageAttributes", "MessageBody"]

MAX_COMBINATIONS = 150
MAX_KEYS = 5
NUMBER_LIMIT = 1e9
OR_KEY = "$or"
# event-ruler's RESERVED_FIELD_NAMES_IN_OR_RELATIONSHIP: not usable as keys inside "$or".
_RESERVED = frozenset(
    "exactly equals-ignore-case prefix suffix anything-but exists wildcard numeric cidr = < <= > >= "
    "regex not-wildcard not-equals-ignore-case date-after date-on-or-after date-before "
    "date-on-or-before in-date-range ip-address-in-range ip-address-not-in-range".split()
)
COMPARE: dict[str, Callable[[float, float], bool]] = {
    "=": operator.eq,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


class PolicyError(ValueError):
    """A filter policy that SNS would reject."""


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(policy: Mapping[str, Any], *, scope: Scope | None = None) -> None:
    """Raise ``PolicyError`` for anything SNS would reject.

    ``scope=None`` accepts what either scope accepts (nested objects included); pass the
    subscription's scope to also reject nesting in ``MessageAttributes`` scope.
    """
    if not isinstance(policy, Mapping):
        raise PolicyError(f"a filter policy must be a JSON object, got {type(policy).__name__}")
    if not policy:
        return  # SNS: an empty policy means no filtering
    _check_object(policy, "", nested_ok=scope != "MessageAttributes", in_or=False)
    terms = _expand(policy, ())
    combinations = sum(math.prod(t.values()) for t in terms)
    if combinations > MAX_COMBINATIONS:
        raise PolicyError(
            f"too many combinations: {combinations} > {MAX_COMBINATIONS} "
            "(the product of the number of values of each key, summed over the $or branches)"
        )
    for term in terms:
        keys = sorted({path[0] for path in term})
        if len(keys) > MAX_KEYS:
            raise PolicyError(f"too many keys: {keys} (at most {MAX_KEYS} per $or branch)")


def _check_object(obj: Mapping[str, Any], where: str, *, nested_ok: bool, in_or: bool) -> None:
    if not obj:
        raise PolicyError(f"{where or 'policy'}: empty objects are not allowed")
    for key, cond in obj.items():
        if not isinstance(key, str):
            raise PolicyError(f"{where or 'policy'}: keys must be strings, got {key!r}")
        here = f"{where}.{key}" if where else key
        if key == OR_KEY:
            _check_or(cond, here, nested_ok=nested_ok)
        elif in_or and key in _RESERVED:
            raise PolicyError(f"{here}: {key!r} is an operator name and cannot be a key inside $or")
        elif isinstance(cond, Mapping):
            if not nested_ok:
                raise PolicyError(f"{here}: nested policies need scope MessageBody")
            _check_object(cond, here, nested_ok=nested_ok, in_or=in_or)
        elif isinstance(cond, list):
            _check_rules(cond, here)
        else:
            raise PolicyError(f"{here}: must be an array of conditions, got {cond!r}")


def _check_or(cond: Any, where: str, *, nested_ok: bool) -> None:
    if not isinstance(cond, list) or len(cond) < 2 or not all(isinstance(b, Mapping) for b in cond):
        raise PolicyError(f"{where}: must be an array of at least 2 objects")
    for i, branch in enumerate(cond):
        _check_object(branch, f"{where}[{i}]", nested_ok=nested_ok, in_or=True)


def _check_rules(rules: list[Any], where: str) -> None:
    if not rules:
        raise PolicyError(f"{where}: empty arrays are not allowed")
    for rule in rules:
        if isinstance(rule, Mapping):
            _check_operator(rule, where)
        elif is_number(rule):
            if not math.isfinite(rule):
                raise PolicyError(f"{where}: {rule!r} is not a finite number")
        elif not (rule is None or isinstance(rule, (str, bool))):
            raise PolicyError(
                f"{where}: {rule!r}: a value must be a string, number, true, false, null or an operator"
            )


def _check_operator(rule: Mapping[str, Any], where: str) -> None:
    if len(rule) != 1:
        raise PolicyError(f"{where}: an operator object takes exactly one key, got {sorted(rule)}")
    ((op, arg),) = rule.items()
    check = _CHECKS.get(op)
    if check is None:
        raise PolicyError(f"{where}: unknown operator {op!r} (known: {', '.join(sorted(_CHECKS))})")
    check(arg, f"{where}: {op}")


def _check_str(arg: Any, where: str) -> None:
    if not isinstance(arg, str):
        raise PolicyError(f"{where} takes a string, got {arg!r}")


def _check_bool(arg: Any, where: str) -> None:
    if not isinstance(arg, bool):
        raise PolicyError(f"{where} takes true or false, got {arg!r}")


def _check_number(arg: Any, where: str) -> None:
    if not is_number(arg) or not math.isfinite(arg):
        raise PolicyError(f"{where} takes numbers, got {arg!r}")
    if abs(arg) > NUMBER_LIMIT:
        raise PolicyError(f"{where}: {arg!r} is outside -1e9..1e9")


def _check_wildcard(arg: Any, where: str) -> None:
    _check_str(arg, where)
    i, previous_star = 0, False
    while i < len(arg):
        if arg[i] == "\\":
            if arg[i + 1 : i + 2] not in ("*", "\\"):
                raise PolicyError(f"{where}: a backslash may only escape '*' or '\\' in {arg!r}")
            i, previous_star = i + 2, False
            continue
        if arg[i] == "*" and previous_star:
            raise PolicyError(f"{where}: consecutive '*' are not allowed in {arg!r}")
        i, previous_star = i + 1, arg[i] == "*"


def _check_cidr(arg: Any, where: str) -> None:
    _check_str(arg, where)
    try:
        ipaddress.ip_network(arg, strict=False)
    except ValueError as e:
        raise PolicyError(f"{where}: {arg!r} is not an IP network: {e}") from e


def _check_numeric(arg: Any, where: str) -> None:
    if not isinstance(arg, list) or len(arg) not in (2, 4):
        raise PolicyError(f"{where} takes [op, number] or ['>'|'>=', low, '<'|'<=', high], got {arg!r}")
    for op, bound in zip(arg[::2], arg[1::2], strict=True):
        if not isinstance(op, str) or op not in COMPARE:
            raise PolicyError(f"{where}: unknown comparison {op!r} (known: = < <= > >=)")
        _check_number(bound, where)
    if len(arg) == 4:
        if arg[0] not in (">", ">=") or arg[2] not in ("<", "<="):
            raise PolicyError(f"{where}: a range is a lower bound (> or >=) then an upper one (< or <=)")
        if arg[1] >= arg[3]:
            raise PolicyError(f"{where}: the lower bound {arg[1]} is not below the upper bound {arg[3]}")


def _check_anything_but(arg: Any, where: str) -> None:
    if isinstance(arg, Mapping):
        _check_anything_but_operator(arg, where)
        return
    values = arg if isinstance(arg, list) else [arg]
    if values and all(isinstance(v, str) for v in values):
        return
    if values and all(is_number(v) for v in values):
        for v in values:
            _check_number(v, where)
        return
    raise PolicyError(f"{where} takes a string, a number, or a non-empty list of either, got {arg!r}")


def _check_anything_but_operator(arg: Mapping[str, Any], where: str) -> None:
    if len(arg) != 1:
        raise PolicyError(f"{where}: an operator object takes exactly one key, got {sorted(arg)}")
    ((op, value),) = arg.items()
    here = f"{where}: {op}"
    if op in ("prefix", "suffix"):
        _check_str(value, here)
        if not value:
            raise PolicyError(f"{here} must not be empty")
    elif op == "equals-ignore-case":
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            _check_str(value, here)
    elif op == "wildcard":
        _check_wildcard(value, here)
    else:
        known = "prefix, suffix, equals-ignore-case, wildcard"
        raise PolicyError(f"{where}: unsupported operator {op!r} ({known})")


_CHECKS: dict[str, Callable[[Any, str], None]] = {
    "prefix": _check_str,
    "suffix": _check_str,
    "equals-ignore-case": _check_str,
    "wildcard": _check_wildcard,
    "cidr": _check_cidr,
    "exists": _check_bool,
    "numeric": _check_numeric,
    "anything-but": _check_anything_but,
}


def _expand(obj: Mapping[str, Any], prefix: tuple[str, ...]) -> list[dict[tuple[str, ...], int]]:
    """The policy as OR-ed AND-terms (what "$or" forks into), each {key path: number of values}."""
    terms: list[dict[tuple[str, ...], int]] = [{}]
    for key, cond in obj.items():
        if key == OR_KEY:
            sub = [t for branch in cond for t in _expand(branch, prefix)]
        elif isinstance(cond, Mapping):
            sub = _expand(cond, (*prefix, key))
        else:
            sub = [{(*prefix, key): len(cond)}]
        terms = [{**t, **s} for t in terms for s in sub]
        if len(terms) > MAX_COMBINATIONS:
            raise PolicyError(f"too many combinations: over {MAX_COMBINATIONS} $or branches")
    return terms
