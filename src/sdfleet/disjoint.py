"""First-match routing as SNS filter policies: each queue's effective policy excludes earlier queues.

SNS delivers a message to *every* subscription whose policy matches, but a fleet file is read in
order: a task several filters accept runs on the first of them. Copies elsewhere would wake a
worker from zero only for it to drop the copy. ``effective_filters`` therefore compiles the order
into the policies themselves: queue *i* gets ``filter_i AND NOT filter_j`` for every earlier queue
*j* it may overlap, written in SNS's own language (``anything-but``, ``exists``, ``$or``). Every
engine's topology (``routing.fleet_topology``), the deploy values and the CDK app use the result.

What SNS cannot say is refused when the fleet file loads (``OverlapError``, with an example
message both queues accept): the exclusion of a ``numeric`` condition (except on an attribute
that is always a number, ``bus.base.NUMBER_ATTRIBUTES``: there it is the ranges around it, so
``priority`` lanes work) or of a ``cidr`` one, of ``true``,
``false`` or ``null``, two different conditions on one key that must both hold, queues of
different filter scopes, or a policy past SNS's limits. A queue that an earlier one shadows whole
is refused too. Exclusions treat a key as holding one value (an attribute ``String.Array`` is
excluded element by element, as SNS's ``anything-but`` does; a JSON array in a body is not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdfleet._policy_algebra import ABSENT, Branch, Inexpressible, conjoin, dnf, negate, overlaps
from sdfleet._policy_validate import MAX_COMBINATIONS, OR_KEY, PolicyError, Scope, validate
from sdfleet._policy_witness import example_message
from sdfleet.bus.base import NUMBER_ATTRIBUTES

if TYPE_CHECKING:
    from sdfleet.settings import QueueConfig


_NUMBERS = {(name,) for name in NUMBER_ATTRIBUTES}


class OverlapError(ValueError):
    """Two queues accept one task and SNS's filter language cannot keep it off the later one."""


@dataclass(frozen=True)
class EffectiveFilter:
    """What a queue's subscription holds: ``policy`` None means every message."""

    policy: dict[str, Any] | None
    scope: Scope


def effective_filters(queues: Sequence[QueueConfig]) -> list[EffectiveFilter]:
    """Per queue, in order, the policy that accepts exactly what first-match routing gives it.

    Raises ``OverlapError`` for an overlap SNS cannot exclude or a queue that gets no task.
    """
    try:
        forms: list[list[Branch]] = [[{}] if q.filter is None else dnf(q.filter) for q in queues]
    except Inexpressible as e:
        raise OverlapError(f"a filter SNS cannot evaluate as written: {e}") from None
    earlier = list(zip(forms, queues, strict=True))
    return [_effective(q, forms[i], earlier[:i]) for i, q in enumerate(queues)]


def _scope_of(q: QueueConfig) -> Scope | None:
    return None if q.filter is None else q.filter_scope


def _effective(
    q: QueueConfig, own: list[Branch], earlier: list[tuple[list[Branch], QueueConfig]]
) -> EffectiveFilter:
    result, scope = own, _scope_of(q)
    for other_form, other in earlier:
        same = scope is None or _scope_of(other) in (None, scope)
        if not overlaps(own, other_form, same_scope=same):
            continue
        if not same:
            raise OverlapError(f"{_clash(q, other)}, and they filter different scopes")
        scope = scope or _scope_of(other)
        try:
            result = _exclude(result, other_form, numbers=scope == "MessageAttributes")
        except Inexpressible as e:
            raise OverlapError(
                f"{_clash(q, other)}, and SNS cannot exclude it from {q.name!r}: {e}"
            ) from None
        if not result:
            raise OverlapError(
                f"queue {q.name!r} receives no task: every task it accepts goes to {other.name!r} "
                "or another queue before it"
            )
    if result is own:  # nothing to exclude: the policy as written
        return EffectiveFilter(q.filter, q.filter_scope)
    scope = scope or q.filter_scope
    return EffectiveFilter(_emit(result, q.name, scope), scope)


def _clash(q: QueueConfig, other: QueueConfig) -> str:
    """``queues 'a' and 'b' both accept <an example>`` (first-match order runs it on ``other``)."""
    found = example_message(q.filter, q.filter_scope, other.filter, other.filter_scope)
    example = "some tasks" if found is None else f"a task with {found}"
    return f"queues {other.name!r} and {q.name!r} both accept {example}"


def _exclude(result: list[Branch], other: list[Branch], *, numbers: bool) -> list[Branch]:
    """``result AND NOT other``, distributed back into ORed conjunctions. ``numbers``: the
    attributes' ``NUMBER_ATTRIBUTES`` hold numbers (attribute scope)."""
    for branch in other:
        clause = [(path, negate(cond, number=numbers and path in _NUMBERS)) for path, cond in branch.items()]
        grown: list[Branch] = []
        for r in result:
            for path, neg in clause:
                m = conjoin(r, {path: neg})
                if m is not None and m not in grown:
                    grown.append(m)
        if len(grown) > MAX_COMBINATIONS:
            raise Inexpressible(f"over {MAX_COMBINATIONS} $or branches")
        result = grown
    return result


# -- back to a policy ------------------------------------------------------------------------------


def _emit(branches: list[Branch], queue: str, scope: Scope) -> dict[str, Any] | None:
    """A policy for ORed conjunctions: ``exists: false`` gets a branch of its own, as SNS lists
    it on its own in its examples; several branches go under ``$or``."""
    split: list[Branch] = []
    for b in branches:
        split.extend(b2 for b2 in _split_absent(b) if b2 not in split)
    if any(not b for b in split):
        return None  # one branch takes everything
    objects = [_unflatten(b) for b in split]
    policy = objects[0] if len(objects) == 1 else {OR_KEY: objects}
    try:
        validate(policy, scope=scope)
    except PolicyError as e:
        raise OverlapError(f"queue {queue!r}: its filter without the earlier queues' tasks: {e}") from None
    return policy


def _split_absent(branch: Branch) -> list[Branch]:
    out: list[Branch] = [{}]
    for path, cond in branch.items():
        options = [[r] for r in cond if r == ABSENT]
        rest = [r for r in cond if r != ABSENT]
        if rest:
            options.append(rest)
        out = [{**b, path: opt} for b in out for opt in options]
    return out


def _unflatten(branch: Branch) -> dict[str, Any]:
    policy: dict[str, Any] = {}
    for path, cond in branch.items():
        node = policy
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = cond
    return policy
