"""First-match order compiled into SNS filter policies (``sdfleet.disjoint``): every message reaches
exactly the first queue whose own filter accepts it; what SNS cannot say is refused at load."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from sdfleet.disjoint import OverlapError, effective_filters
from sdfleet.errors import ConfigError
from sdfleet.policy import matches, validate
from sdfleet.settings import FleetConfig, QueueConfig, load_fleet

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sdfleet.yaml"
SD15 = "v1-5-pruned-emaonly.safetensors"


def _queues(*specs: dict[str, Any]) -> list[QueueConfig]:
    return [QueueConfig.model_validate(s) for s in specs]


def _grid(values: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the values (None: the key is absent). sdfleet's messages always carry
    attributes (``task_id``, ``tenant``, ...): SNS matches no policy on a message without any."""
    keys = list(values)
    out = []
    for combo in itertools.product(*values.values()):
        out.append({k: v for k, v in zip(keys, combo, strict=True) if v is not None})
    return out


def _route(
    queues: list[QueueConfig], message: dict[str, Any], body: bool = False
) -> tuple[list[str], str | None]:
    """(queues the effective policies deliver to, the first queue whose own filter accepts)."""

    def hit(policy: dict[str, Any] | None, scope: str) -> bool:
        if policy is None:
            return True
        if scope == "MessageBody":
            return matches(policy, body=message, scope="MessageBody")
        return matches(policy, attributes=message)

    effective = effective_filters(queues)
    delivered = [q.name for q, e in zip(queues, effective, strict=True) if hit(e.policy, e.scope)]
    first = next((q.name for q in queues if hit(q.filter, q.filter_scope)), None)
    return delivered, first


FLEETS = {
    "example": (
        load_fleet(EXAMPLE).queues,
        {
            "sd_model_checkpoint": [None, SD15, "sdxl"],
            "tenant_tier": [None, "paid", "standard"],
            "task_id": ["t"],
        },
    ),
    "overlapping lists": (
        _queues(
            {"name": "p", "filter": {"m": ["a", "b"], "t": ["paid"]}},
            {"name": "q", "filter": {"m": ["a", "c"]}},
            {"name": "rest"},
        ),
        {"m": [None, "a", "b", "c", "d"], "t": [None, "paid", "free"], "task_id": ["t"]},
    ),
    "prefixes and exists": (
        _queues(
            {"name": "xl", "filter": {"m": [{"prefix": "sdxl"}]}},
            {"name": "tagged", "filter": {"tag": [{"exists": True}]}},
            {"name": "webui", "filter": {"runtime": ["a1111"]}},
            {"name": "rest"},
        ),
        {
            "m": [None, "sdxl-1", "sd15", "other"],
            "tag": [None, "x"],
            "runtime": [None, "a1111", "diffusers"],
            "task_id": ["t"],
        },
    ),
    "priority lanes": (  # ``priority`` is a number attribute: ranges exclude each other
        _queues(
            {"name": "urgent", "filter": {"priority": [{"numeric": [">=", 7]}]}},
            {"name": "soon", "filter": {"priority": [{"numeric": [">", 2, "<=", 8]}], "m": ["a"]}},
            {"name": "picked", "filter": {"priority": [{"numeric": ["=", 1]}, 4]}},
            {"name": "sd15", "filter": {"m": [SD15]}},
            {"name": "rest"},
        ),
        {"priority": [None, 0, 1, 2, 2.5, 3, 4, 6.5, 7, 8, 9], "m": [None, "a", SD15], "task_id": ["t"]},
    ),
}


@pytest.mark.parametrize("name", sorted(FLEETS))
def test_every_message_reaches_exactly_its_first_match(name: str) -> None:
    queues, values = FLEETS[name]
    for e in effective_filters(queues):
        if e.policy is not None:
            validate(e.policy, scope=e.scope)  # what SNS accepts
    for message in _grid(values):
        delivered, first = _route(queues, message)
        assert delivered == ([first] if first else []), (message, delivered)


def test_body_scope_and_a_catch_all_after_it() -> None:
    queues = _queues(
        {"name": "xl", "filter": {"task": {"model": [{"prefix": "sdxl"}]}}, "filter_scope": "MessageBody"},
        {"name": "rest"},
    )
    effective = effective_filters(queues)
    assert effective[1].scope == "MessageBody"
    for model in (None, "sdxl-1", "sd15"):
        body = {"task": {"prompt": "p"} | ({"model": model} if model else {})}
        delivered, first = _route(queues, body)
        assert delivered == [first], (body, delivered)


def test_disjoint_filters_are_kept_as_written() -> None:
    queues = _queues(
        {"name": "sd15", "filter": {"m": [SD15]}},
        {"name": "dynamic", "filter": {"m": [{"anything-but": [SD15]}]}},
    )
    assert [e.policy for e in effective_filters(queues)] == [q.filter for q in queues]
    lanes = _queues(
        {"name": "low", "filter": {"priority": [{"numeric": ["<", 5]}]}},
        {"name": "high", "filter": {"priority": [{"numeric": [">=", 5, "<=", 9]}]}},
    )
    assert [e.policy for e in effective_filters(lanes)] == [q.filter for q in lanes]


def test_a_priority_lane_before_the_rest_leaves_it_the_lower_priorities() -> None:
    queues = _queues({"name": "urgent", "filter": {"priority": [{"numeric": [">=", 5]}]}}, {"name": "rest"})
    assert effective_filters(queues)[1].policy == {
        "$or": [{"priority": [{"exists": False}]}, {"priority": [{"numeric": ["<", 5]}]}]
    }
    # Another key may hold a string, which NOT numeric takes and SNS cannot say: still refused.
    message = _refusal({"name": "a", "filter": {"steps": [{"numeric": [">=", 5]}]}}, {"name": "rest"})
    assert "no negation" in message


def _refusal(*specs: dict[str, Any]) -> str:
    with pytest.raises(OverlapError) as info:
        effective_filters(_queues(*specs))
    return str(info.value)


def _example(message: str) -> dict[str, Any]:
    return json.loads(message.split("attributes ", 1)[1].split(", and", 1)[0])  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "first,reason",
    [
        ({"n": [{"numeric": [">", 5]}]}, "no negation"),
        ({"ip": [{"cidr": "10.0.0.0/8"}]}, "no negation"),
        ({"m": [{"suffix": "-turbo"}]}, "cannot require both"),
    ],
)
def test_overlaps_sns_cannot_exclude_are_refused_with_an_example(first: dict[str, Any], reason: str) -> None:
    second = {"m": [{"prefix": "sdxl"}], "n": [{"exists": True}], "ip": [{"exists": True}]}
    message = _refusal({"name": "a", "filter": first}, {"name": "b", "filter": second})
    assert reason in message and "'a' and 'b' both accept a task with attributes" in message
    example = _example(message)
    assert matches(first, attributes=example) and matches(second, attributes=example)


def test_shadowed_queue_and_mixed_scopes_are_refused() -> None:
    assert "receives no task" in _refusal({"name": "all"}, {"name": "later", "filter": {"m": ["a"]}})
    message = _refusal(
        {"name": "body", "filter": {"task": {"m": ["a"]}}, "filter_scope": "MessageBody"},
        {"name": "attrs", "filter": {"m": ["a"]}},
    )
    assert "different scopes" in message and 'body {"task": {"m": "a"}}' in message


def test_a_fleet_file_with_such_an_overlap_does_not_load(tmp_path: Path) -> None:
    path = tmp_path / "sdfleet.yaml"
    path.write_text(
        "queues:\n"
        "  - {name: big, filter: {steps: [{numeric: ['>', 50]}]}}\n"
        "  - {name: sd15, filter: {sd_model_checkpoint: [v1-5.safetensors]}}\n"
    )
    with pytest.raises(ConfigError, match="'big' and 'sd15' both accept a task with attributes"):
        load_fleet(path)
    FleetConfig.model_validate({"queues": [{"name": "only", "filter": {"steps": [{"numeric": [">", 50]}]}}]})
