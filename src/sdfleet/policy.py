"""SNS subscription filter policies: ``validate`` a policy, ``matches`` one message against it.

Every bus backend except ``aws://`` routes with ``matching_queues`` (on AWS, SNS evaluates the
policy itself). Semantics follow the Amazon SNS developer guide (the "Amazon SNS message filtering"
pages) and aws/event-ruler, the matcher SNS filtering is built on:

- keys are ANDed; the values listed for one key are ORed; ``$or`` ORs whole sub-policies;
- every condition except ``{"exists": false}`` needs the key present: ``anything-but`` and
  ``numeric`` never match an absent key; ``exists: false`` matches only absence, and (as SNS
  documents) never matches a message that has no attributes at all;
- an array (a ``String.Array`` attribute, a JSON array in the body) matches a condition when any
  one element does; except that ``anything-but`` on a ``String.Array`` attribute needs every
  element to pass (none listed), as the SNS guide states, while on a body array one element
  passing is enough (event-ruler; the guide's numeric body example);
- ``exists: true`` needs a non-null, non-empty value;
- strings and numbers are different types: the condition ``"5"`` never matches the number 5, and
  the condition ``5`` never matches the string ``"5"``.

Attribute scope: a Python ``str`` is an SNS ``String`` attribute, ``int``/``float`` a ``Number``,
a ``list`` a ``String.Array`` (elements keep their JSON types), ``bytes`` a ``Binary`` (ignored,
as SNS ignores it). The SNS wire forms ``{"DataType", "StringValue"}`` and ``{"Type", "Value"}``
are read too. The sdfleet bus publishes attributes as ``str`` except ``NUMBER_ATTRIBUTES``
(``bus.base``), which ``matching_queues`` reads as numbers, as SNS does on AWS. One deliberate
difference from SNS: in attribute scope the ``numeric`` operator also matches a string that reads
as a number (``"42"``, ``"-1.5e3"``). Exact values and ``anything-but`` keep SNS's strict typing.

Body scope: the body is JSON (a body that is not a JSON object matches nothing). Nested policy
objects walk nested body objects; when the body holds an array of objects there, one element must
match the whole nested policy (event-ruler's array-consistent matching).

``matches`` assumes a policy that passed ``validate``; operators it cannot read raise
``PolicyError``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any, TypeAlias

from sdfleet._policy_validate import (
    COMPARE,
    MAX_COMBINATIONS,
    MAX_KEYS,
    OR_KEY,
    PolicyError,
    Scope,
    is_number,
    validate,
)
from sdfleet.bus.base import typed_attributes

if TYPE_CHECKING:
    from sdfleet.bus.base import Subscription

__all__ = [
    "MAX_COMBINATIONS",
    "MAX_KEYS",
    "AttrValue",
    "PolicyError",
    "Scope",
    "matches",
    "matching_queues",
    "validate",
]

AttrValue: TypeAlias = str | int | float | bool | list["AttrValue"] | None
"""An attribute value: String, Number, String.Array (elements keep their JSON types)."""

_SCOPES = ("MessageAttributes", "MessageBody")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_SKIP = object()  # an attribute SNS does not filter on (Binary, unreadable)


def matches(
    policy: Mapping[str, Any],
    attributes: Mapping[str, Any] | None = None,
    body: bytes | str | Mapping[str, Any] | None = None,
    *,
    scope: Scope = "MessageAttributes",
) -> bool:
    """Whether SNS would deliver this message to a subscription with this policy and scope."""
    return _Message(attributes, body).matches(policy, scope)


def matching_queues(
    subscriptions: Iterable[Subscription],
    topic: str,
    attributes: Mapping[str, str],
    body: bytes,
) -> list[str]:
    """Queues of ``topic``'s subscriptions that accept the message, in subscription order, once each.

    ``attributes`` as the bus publishes them: strings, ``NUMBER_ATTRIBUTES`` read as numbers.
    A subscription without a filter policy accepts every message.
    """
    message = _Message(typed_attributes(attributes), body)
    queues: list[str] = []
    for sub in subscriptions:
        if sub.topic != topic or sub.queue in queues:
            continue
        if sub.filter_policy is None or message.matches(sub.filter_policy, sub.scope):
            queues.append(sub.queue)
    return queues


class _Message:
    """One message, its attributes and body each read once however many policies look at it."""

    def __init__(self, attributes: Mapping[str, Any] | None, body: Any) -> None:
        self._attributes = attributes or {}
        self._body = body

    @cached_property
    def attributes(self) -> dict[str, Any]:
        values = {k: _attribute_value(v) for k, v in self._attributes.items()}
        return {k: v for k, v in values.items() if v is not _SKIP}

    @cached_property
    def body(self) -> Mapping[str, Any] | None:
        if self._body is None or isinstance(self._body, Mapping):
            return self._body
        try:
            doc = json.loads(self._body)
        except (TypeError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def matches(self, policy: Mapping[str, Any], scope: Scope) -> bool:
        if scope not in _SCOPES:
            raise PolicyError(f"unknown filter policy scope {scope!r} (MessageAttributes, MessageBody)")
        if not policy:
            return True
        in_attributes = scope == "MessageAttributes"
        node = self.attributes if in_attributes else self.body
        # SNS: no attributes at all (or an empty/non-JSON body) matches no policy, exists:false included
        return bool(node) and _match_object(policy, node, in_attributes=in_attributes)


def _attribute_value(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _SKIP
    if isinstance(value, Mapping):
        return _wire_attribute_value(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _wire_attribute_value(value: Mapping[str, Any]) -> Any:
    """``{"DataType": "Number", "StringValue": "5"}`` (Publish) or ``{"Type", "Value"}`` (delivery)."""
    data_type = str(value.get("DataType") or value.get("Type") or "")
    raw = value.get("StringValue", value.get("Value"))
    if not isinstance(raw, str):
        return _SKIP
    if data_type == "String.Array":
        try:
            items = json.loads(raw)
        except ValueError:
            return _SKIP
        return items if isinstance(items, list) else _SKIP
    base = data_type.split(".", 1)[0]  # custom types: "Number.int", "String.uuid"
    if base == "Number":
        number = _parse_number(raw)
        return _SKIP if number is None else number
    return raw if base == "String" else _SKIP


def _match_object(policy: Mapping[str, Any], node: Mapping[str, Any] | None, *, in_attributes: bool) -> bool:
    for key, cond in policy.items():
        if key == OR_KEY:
            ok = any(_match_object(b, node, in_attributes=in_attributes) for b in _or_branches(cond))
        elif isinstance(cond, Mapping):
            if in_attributes:
                raise PolicyError(f"{key}: nested policies need scope MessageBody")
            ok = _match_nested(cond, None if node is None else node.get(key))
        elif isinstance(cond, list):
            values = _leaf_values(node, key)
            ok = any(_match_rule(rule, values, in_attributes=in_attributes) for rule in cond)
        else:
            raise PolicyError(f"{key}: must be an array of conditions, got {cond!r}")
        if not ok:
            return False
    return True


def _or_branches(cond: Any) -> list[Mapping[str, Any]]:
    if not isinstance(cond, list) or not all(isinstance(b, Mapping) for b in cond):
        raise PolicyError(f"{OR_KEY}: must be an array of at least 2 objects")
    return cond


def _match_nested(policy: Mapping[str, Any], child: Any) -> bool:
    if isinstance(child, Mapping):
        return _match_object(policy, child, in_attributes=False)
    objects = [e for e in _flatten(child) if isinstance(e, Mapping)] if isinstance(child, list) else []
    if objects:
        return any(_match_object(policy, o, in_attributes=False) for o in objects)
    return _match_object(policy, None, in_attributes=False)


def _leaf_values(node: Mapping[str, Any] | None, key: str) -> list[Any] | None:
    """The leaf values under ``key``; None when the key is absent or holds an object."""
    if node is None or key not in node or isinstance(node[key], Mapping):
        return None
    value = node[key]
    if isinstance(value, list):
        return [e for e in _flatten(value) if not isinstance(e, Mapping)]
    return [value]


def _flatten(items: list[Any]) -> Iterator[Any]:
    for item in items:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def _match_rule(rule: Any, values: list[Any] | None, *, in_attributes: bool) -> bool:
    if isinstance(rule, Mapping):
        return _match_operator(rule, values, in_attributes=in_attributes)
    return values is not None and any(_same(rule, v) for v in values)


def _same(expected: Any, value: Any) -> bool:
    """JSON equality: strings, numbers, booleans and null never equal one another."""
    if isinstance(expected, bool) or expected is None or isinstance(value, bool) or value is None:
        return expected is value
    if isinstance(expected, str) or isinstance(value, str):
        return isinstance(expected, str) and isinstance(value, str) and expected == value
    return is_number(expected) and is_number(value) and bool(expected == value)


def _match_operator(rule: Mapping[str, Any], values: list[Any] | None, *, in_attributes: bool) -> bool:
    if len(rule) != 1:
        raise PolicyError(f"an operator object takes exactly one key, got {sorted(rule)}")
    ((op, arg),) = rule.items()
    if op == "exists":
        present = values is not None and any(v is not None and v != "" for v in values)
        return present is bool(arg)
    if values is None:
        return False
    if op == "numeric":
        return any(_in_range(arg, x) for x in _numbers(values, lenient=in_attributes))
    if op == "anything-but":
        passing = [_anything_but(arg, v) for v in values]
        return bool(passing) and (all(passing) if in_attributes else any(passing))
    test = _string_test(op, arg)
    return any(isinstance(v, str) and test(v) for v in values)


def _anything_but(arg: Any, value: Any) -> bool:
    """Whether one value passes: not listed (typed), or a string failing the string operator."""
    if isinstance(arg, Mapping):
        ((op, operand),) = arg.items()
        return isinstance(value, str) and not _string_test(op, operand)(value)
    excluded = arg if isinstance(arg, list) else [arg]
    return not any(_same(e, value) for e in excluded)


def _string_test(op: str, arg: Any) -> Callable[[str], bool]:
    if op == "prefix":
        return lambda s: s.startswith(arg)
    if op == "suffix":
        return lambda s: s.endswith(arg)
    if op == "equals-ignore-case":
        folded = {a.casefold() for a in (arg if isinstance(arg, list) else [arg])}
        return lambda s: s.casefold() in folded
    if op == "wildcard":
        regex = _wildcard_regex(arg)
        return lambda s: regex.fullmatch(s) is not None
    if op == "cidr":
        network = _network(arg)
        return lambda s: _in_network(s, network)
    raise PolicyError(f"unknown operator {op!r}")


def _numbers(values: list[Any], *, lenient: bool) -> Iterator[float]:
    for v in values:
        if is_number(v):
            yield v
        elif lenient and isinstance(v, str):
            number = _parse_number(v)
            if number is not None:
                yield number


def _in_range(spec: list[Any], x: float) -> bool:
    return all(COMPARE[op](x, bound) for op, bound in zip(spec[::2], spec[1::2], strict=True))


def _parse_number(text: str) -> float | None:
    return float(text) if _NUMBER_RE.fullmatch(text) else None


@lru_cache(maxsize=256)
def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    parts, i = [], 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            parts.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        parts.append(".*" if pattern[i] == "*" else re.escape(pattern[i]))
        i += 1
    return re.compile("".join(parts), re.DOTALL)


@lru_cache(maxsize=256)
def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError as e:
        raise PolicyError(f"cidr: {cidr!r} is not an IP network") from e


def _in_network(text: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(text) in network
    except ValueError:
        return False
