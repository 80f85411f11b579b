"""The SNS filter-policy engine, table-driven from the Amazon SNS developer guide.

Sources of the cases (each table names its page):
- SNS: https://docs.aws.amazon.com/sns/latest/dg/example-filter-policies.html
- SNS: https://docs.aws.amazon.com/sns/latest/dg/string-value-matching.html
- SNS: https://docs.aws.amazon.com/sns/latest/dg/numeric-value-matching.html
- SNS: https://docs.aws.amazon.com/sns/latest/dg/attribute-key-matching.html
- SNS: https://docs.aws.amazon.com/sns/latest/dg/and-or-logic.html
- SNS: https://docs.aws.amazon.com/sns/latest/dg/subscription-filter-policy-constraints.html
- event-ruler (the matcher behind SNS filtering): https://github.com/aws/event-ruler README
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from sdfleet.bus.base import Subscription
from sdfleet.policy import PolicyError, matches, matching_queues, validate
from sdfleet.settings import QueueConfig

P = pytest.param
ATTRS = "MessageAttributes"

# example-filter-policies.html: the customer-transaction message, as Python attributes ...
EXAMPLE_ATTRIBUTES: dict[str, Any] = {
    "customer_interests": ["soccer", "rugby", "hockey"],
    "store": "example_corp",
    "event": "order_placed",
    "price_usd": 210.75,
}
# ... as SNS delivers them (Type/Value strings) ...
EXAMPLE_WIRE = {
    "customer_interests": {"Type": "String.Array", "Value": '["soccer", "rugby", "hockey"]'},
    "store": {"Type": "String", "Value": "example_corp"},
    "event": {"Type": "String", "Value": "order_placed"},
    "price_usd": {"Type": "Number", "Value": "210.75"},
}
# ... and as the same properties in the message body.
EXAMPLE_BODY = json.dumps(EXAMPLE_ATTRIBUTES).encode()
EXAMPLE_ACCEPTS = {
    "store": ["example_corp"],
    "event": [{"anything-but": "order_cancelled"}],
    "customer_interests": ["rugby", "football", "baseball"],
    "price_usd": [{"numeric": [">=", 100]}],
}
EXAMPLE_REJECTS = {
    "store": ["example_corp"],
    "event": ["order_cancelled"],
    "encrypted": [False],
    "customer_interests": ["basketball", "baseball"],
}

RUGBY_TENNIS = {"customer_interests": ["rugby", "tennis"]}
NOT_RUGBY_TENNIS = {"customer_interests": [{"anything-but": ["rugby", "tennis"]}]}
NOT_ORDER_PREFIX = {"event": [{"anything-but": {"prefix": "order-"}}]}
CIDR = {"source_ip": [{"cidr": "10.0.0.0/24"}]}
PRICE_RANGE = {"price_usd": [{"numeric": [">", 0, "<=", 150]}]}
NOT_100_500 = {"price": [{"anything-but": [100, 500]}]}
STORE_EXISTS = {"store": [{"exists": True}]}
STORE_ABSENT = {"store": [{"exists": False}]}
RUGBY_AND_PRICE = {"customer_interests": ["rugby"], "price_usd": [{"numeric": [">", 100]}]}
# and-or-logic.html, "Standard OR": source && (metricName || namespace)
STANDARD_OR = {
    "source": ["aws.cloudwatch"],
    "$or": [{"metricName": ["CPUUtilization"]}, {"namespace": ["AWS/EC2"]}],
}
# event-ruler README, "Nested Or and And": source && (metricName || (metricType && namespace &&
# (metricId || spaceId)) || scope)
NESTED_OR = {
    "source": ["aws.cloudwatch"],
    "$or": [
        {"metricName": ["CPUUtilization", "ReadLatency"]},
        {
            "metricType": ["MetricType"],
            "namespace": ["AWS/EC2", "AWS/ES"],
            "$or": [{"metricId": [1234]}, {"spaceId": [1000]}],
        },
        {"scope": ["Service"]},
    ],
}
CW = {"source": "aws.cloudwatch"}
TYPE_NS = {"metricType": "MetricType", "namespace": "AWS/ES"}

ATTRIBUTE_CASES = [
    # example-filter-policies.html
    P(EXAMPLE_ACCEPTS, EXAMPLE_ATTRIBUTES, True, id="example-accepts"),
    P(EXAMPLE_REJECTS, EXAMPLE_ATTRIBUTES, False, id="example-rejects"),
    P(EXAMPLE_ACCEPTS, EXAMPLE_WIRE, True, id="example-accepts-wire-form"),
    P(EXAMPLE_REJECTS, EXAMPLE_WIRE, False, id="example-rejects-wire-form"),
    # string-value-matching.html: exact
    P(RUGBY_TENNIS, {"customer_interests": "rugby"}, True, id="exact-rugby"),
    P(RUGBY_TENNIS, {"customer_interests": "tennis"}, True, id="exact-tennis"),
    P(RUGBY_TENNIS, {"customer_interests": ["rugby", "tennis"]}, True, id="exact-string-array"),
    P(RUGBY_TENNIS, {"customer_interests": "baseball"}, False, id="exact-baseball-no"),
    P(RUGBY_TENNIS, {"customer_interests": ["baseball"]}, False, id="exact-string-array-no"),
    P(RUGBY_TENNIS, {"customer_interests": "Rugby"}, False, id="exact-is-case-sensitive"),
    P(RUGBY_TENNIS, {"other": "rugby"}, False, id="exact-absent-key"),
    # string-value-matching.html: anything-but
    P(NOT_RUGBY_TENNIS, {"customer_interests": "baseball"}, True, id="anything-but-baseball"),
    P(NOT_RUGBY_TENNIS, {"customer_interests": "football"}, True, id="anything-but-football"),
    P(NOT_RUGBY_TENNIS, {"customer_interests": "rugby"}, False, id="anything-but-rugby-no"),
    # The current page: "For String.Array type attributes, it matches if none of the array elements
    # are listed" (its 2023 revision, and numeric-value-matching.html, said one unlisted element
    # was enough; that is kept for body arrays, as event-ruler does)
    P(NOT_RUGBY_TENNIS, {"customer_interests": ["golf", "baseball"]}, True, id="anything-but-none-listed"),
    P(NOT_RUGBY_TENNIS, {"customer_interests": ["rugby", "baseball"]}, False, id="anything-but-one-listed"),
    P(NOT_RUGBY_TENNIS, {"customer_interests": []}, False, id="anything-but-empty-array"),
    P(NOT_RUGBY_TENNIS, {"customer_interests": ["rugby", "tennis"]}, False, id="anything-but-all-excluded"),
    P(NOT_RUGBY_TENNIS, {"store": "x"}, False, id="anything-but-absent-key-no"),
    P({"c": [{"anything-but": ["rugby"]}, {"exists": False}]}, {"s": "x"}, True, id="anything-but-or-absent"),
    P({"e": [{"anything-but": "order_cancelled"}]}, {"e": "order_placed"}, True, id="anything-but-one"),
    P(NOT_ORDER_PREFIX, {"event": "data-entry"}, True, id="anything-but-prefix-data-entry"),
    P(NOT_ORDER_PREFIX, {"event": "order_number"}, True, id="anything-but-prefix-order_number"),
    P(NOT_ORDER_PREFIX, {"event": "order-cancelled"}, False, id="anything-but-prefix-no"),
    P({"s": [{"anything-but": {"suffix": "ball"}}]}, {"s": "rugby"}, True, id="anything-but-suffix"),
    P({"s": [{"anything-but": {"suffix": "ball"}}]}, {"s": "baseball"}, False, id="anything-but-suffix-no"),
    P(
        {"s": [{"anything-but": {"equals-ignore-case": ["R", "TENNIS"]}}]},
        {"s": "tennis"},
        False,
        id="ab-eic-no",
    ),
    P({"s": [{"anything-but": {"equals-ignore-case": "Rugby"}}]}, {"s": "golf"}, True, id="anything-but-eic"),
    P({"s": [{"anything-but": {"wildcard": "*ball"}}]}, {"s": "rugby"}, True, id="anything-but-wildcard"),
    P({"s": [{"anything-but": {"wildcard": "*ball"}}]}, {"s": "baseball"}, False, id="ab-wildcard-no"),
    # string-value-matching.html: prefix, suffix, equals-ignore-case, wildcard, cidr
    P({"customer_interests": [{"prefix": "bas"}]}, {"customer_interests": "baseball"}, True, id="prefix"),
    P({"customer_interests": [{"prefix": "bas"}]}, {"customer_interests": "basketball"}, True, id="prefix-2"),
    P({"customer_interests": [{"prefix": "bas"}]}, {"customer_interests": "rugby"}, False, id="prefix-no"),
    P({"customer_interests": [{"suffix": "ball"}]}, {"customer_interests": "baseball"}, True, id="suffix"),
    P({"customer_interests": [{"suffix": "ball"}]}, {"customer_interests": "rugby"}, False, id="suffix-no"),
    P({"s": [{"equals-ignore-case": "RUGBY"}]}, {"s": "rugby"}, True, id="equals-ignore-case"),
    P({"s": [{"equals-ignore-case": "RUGBY"}]}, {"s": "rugby7"}, False, id="equals-ignore-case-no"),
    P({"s": [{"wildcard": "b*ball"}]}, {"s": "basketball"}, True, id="wildcard"),
    P({"s": [{"wildcard": "b*ball"}]}, {"s": "softball"}, False, id="wildcard-no"),
    P({"s": [{"wildcard": "a\\*b"}]}, {"s": "a*b"}, True, id="wildcard-escaped-star"),
    P({"s": [{"wildcard": "a\\*b"}]}, {"s": "axb"}, False, id="wildcard-escaped-star-no"),
    P(CIDR, {"source_ip": "10.0.0.0"}, True, id="cidr-first"),
    P(CIDR, {"source_ip": "10.0.0.255"}, True, id="cidr-last"),
    P(CIDR, {"source_ip": "10.1.1.0"}, False, id="cidr-outside"),
    P(CIDR, {"source_ip": "not-an-ip"}, False, id="cidr-not-an-ip"),
    P({"ip": [{"cidr": "2001:db8::/32"}]}, {"ip": "2001:db8::1"}, True, id="cidr-ipv6"),
    P({"s": [{"prefix": "4"}]}, {"s": 42}, False, id="prefix-never-matches-number"),
    # numeric-value-matching.html
    P({"price_usd": [{"numeric": ["=", 301.5]}]}, {"price_usd": 301.5}, True, id="numeric-equals"),
    P(
        {"p": [{"numeric": ["=", 301.5]}]},
        {"p": {"DataType": "Number", "StringValue": "3.015e2"}},
        True,
        id="wire",
    ),
    P(NOT_100_500, {"price": 101}, True, id="anything-but-numbers-101"),
    P(NOT_100_500, {"price": 100.1}, True, id="anything-but-numbers-100.1"),
    P(NOT_100_500, {"price": [101, 50]}, True, id="anything-but-numbers-array-none-listed"),
    P(NOT_100_500, {"price": [100, 50]}, False, id="anything-but-numbers-array-one-listed"),
    P(NOT_100_500, {"price": 100}, False, id="anything-but-numbers-no"),
    P({"price_usd": [{"numeric": ["<", 0]}]}, {"price_usd": -1}, True, id="numeric-negative"),
    P({"price_usd": [{"numeric": ["<", 0]}]}, {"price_usd": 0}, False, id="numeric-negative-no"),
    P(PRICE_RANGE, {"price_usd": 150}, True, id="range-upper-inclusive"),
    P(PRICE_RANGE, {"price_usd": 0}, False, id="range-lower-exclusive"),
    P(PRICE_RANGE, {"price_usd": 150.5}, False, id="range-above"),
    P(PRICE_RANGE, {"other": 1}, False, id="numeric-absent-key-no"),
    # sdfleet's choice: the numeric operator also reads numbers out of String attributes ...
    P(PRICE_RANGE, {"price_usd": "75"}, True, id="numeric-on-numeric-string"),
    P({"n": [{"numeric": ["=", 100]}]}, {"n": "1e2"}, True, id="numeric-on-exponent-string"),
    P(PRICE_RANGE, {"price_usd": "cheap"}, False, id="numeric-on-word-no"),
    P(PRICE_RANGE, {"price_usd": ["999", "42"]}, True, id="numeric-on-string-array"),
    # ... but exact values keep SNS's typing: String "42" is not Number 42 and back
    P({"n": [42]}, {"n": "42"}, False, id="exact-number-vs-string-no"),
    P({"n": ["42"]}, {"n": 42}, False, id="exact-string-vs-number-no"),
    P({"n": [42]}, {"n": 42.0}, True, id="exact-number-vs-number"),
    P({"n": [100]}, {"n": {"Type": "Number", "Value": "100.0"}}, True, id="exact-number-vs-wire-number"),
    P({"n": [{"anything-but": [100]}]}, {"n": "100"}, True, id="anything-but-number-vs-string"),
    P({"n": [{"anything-but": ["x"]}]}, {"n": 5}, True, id="anything-but-string-vs-number"),
    # attribute-key-matching.html
    P(STORE_EXISTS, {"store": "fans", "customer_interests": ["baseball"]}, True, id="exists-true"),
    P(STORE_EXISTS, {"customer_interests": ["baseball"]}, False, id="exists-true-absent"),
    P(STORE_ABSENT, {"store": "fans", "customer_interests": ["baseball"]}, False, id="exists-false-present"),
    P(STORE_ABSENT, {"customer_interests": ["baseball"]}, True, id="exists-false-absent"),
    P(STORE_ABSENT, {}, False, id="exists-false-no-attributes-at-all"),
    P(STORE_EXISTS, {"store": b"\x00binary"}, False, id="binary-attribute-ignored"),
    P(STORE_ABSENT, {"store": b"\x00binary", "x": "y"}, True, id="binary-attribute-counts-as-absent"),
    P(STORE_EXISTS, {"store": ""}, False, id="exists-true-needs-non-empty"),
    # and-or-logic.html
    P(RUGBY_AND_PRICE, {"customer_interests": "rugby", "price_usd": 101}, True, id="and"),
    P(RUGBY_AND_PRICE, {"customer_interests": "rugby", "price_usd": 100}, False, id="and-one-fails"),
    P({"c": ["rugby", "football", "baseball"]}, {"c": "football"}, True, id="or-values"),
    P(STANDARD_OR, {**CW, "namespace": "AWS/EC2"}, True, id="$or-second-branch"),
    P(STANDARD_OR, {**CW, "metricName": "CPUUtilization"}, True, id="$or-first-branch"),
    P(STANDARD_OR, CW, False, id="$or-no-branch"),
    P(STANDARD_OR, {"metricName": "CPUUtilization"}, False, id="$or-and-outside-fails"),
    P(NESTED_OR, {**CW, **TYPE_NS, "metricId": 1234}, True, id="$or-nested"),
    P(NESTED_OR, {**CW, **TYPE_NS}, False, id="$or-nested-inner-fails"),
    P(NESTED_OR, {**CW, "scope": "Service"}, True, id="$or-third-branch"),
    # JSON literals inside String.Array
    P({"flags": [True]}, {"flags": [True, "x"]}, True, id="true-in-string-array"),
    P({"flags": [True]}, {"flags": ["true"]}, False, id="true-is-not-the-string-true"),
    P({"flags": [None]}, {"flags": [None]}, True, id="null-in-string-array"),
    # empty policy: no filtering
    P({}, {}, True, id="empty-policy-matches-anything"),
]


@pytest.mark.parametrize(("policy", "attributes", "expected"), ATTRIBUTE_CASES)
def test_attribute_scope(policy: dict[str, Any], attributes: dict[str, Any], expected: bool) -> None:
    validate(policy, scope="MessageAttributes")
    assert matches(policy, attributes) is expected


EMPLOYEES = {
    "employees": [
        {"firstName": "John", "lastName": "Doe"},
        {"firstName": "Anna", "lastName": "Smith"},
        {"firstName": "Peter", "lastName": "Jones"},
    ]
}
NO_C_COUNT = {"detail": {"c-count": [{"exists": False}]}}
RUNNING = {"detail": {"state": ["initializing", "running"]}}
# event-ruler README, "Parallel Or"
PARALLEL_OR = {
    "$or": [{"metricName": ["CPUUtilization"]}, {"namespace": ["AWS/EC2"]}],
    "detail": {"$or": [{"source": ["aws.cloudwatch"]}, {"detail-type": ["CloudWatch Alarm State Change"]}]},
}

BODY_CASES = [
    P(EXAMPLE_ACCEPTS, EXAMPLE_BODY, True, id="example-accepts"),
    P(EXAMPLE_REJECTS, EXAMPLE_BODY, False, id="example-rejects"),
    P(EXAMPLE_ACCEPTS, EXAMPLE_BODY.decode(), True, id="str-body"),
    P(EXAMPLE_ACCEPTS, EXAMPLE_ATTRIBUTES, True, id="mapping-body"),
    P(RUGBY_TENNIS, b'{"customer_interests": "rugby"}', True, id="exact"),
    P(RUGBY_TENNIS, b'{"customer_interests": "baseball"}', False, id="exact-no"),
    P(NOT_RUGBY_TENNIS, b'{"customer_interests": ["rugby", "golf"]}', True, id="anything-but-any-element"),
    P(NOT_RUGBY_TENNIS, b'{"customer_interests": ["rugby", "tennis"]}', False, id="anything-but-all-listed"),
    P(NOT_100_500, b'{"price": [100, 50]}', True, id="anything-but-numbers-array"),
    P(NOT_100_500, b'{"price": 100}', False, id="anything-but-numbers-no"),
    P({"price_usd": [{"numeric": ["=", 301.5]}]}, b'{"price_usd": 3.015e2}', True, id="numeric-exponent"),
    P(PRICE_RANGE, b'{"price_usd": "75"}', False, id="numeric-never-reads-json-strings"),
    P(PRICE_RANGE, b'{"price_usd": true}', False, id="numeric-never-reads-booleans"),
    # nested keys (subscription-filter-policy-constraints.html, event-ruler README)
    P(RUNNING, b'{"detail": {"state": "running"}}', True, id="nested"),
    P(RUNNING, b'{"detail": {"state": "stopped"}}', False, id="nested-no"),
    P(RUNNING, b'{"state": "running"}', False, id="nested-wrong-level"),
    P(RUNNING, b'{"detail": "running"}', False, id="nested-parent-is-scalar"),
    P({"a": {"b": {"c": {"d": [1]}}}}, b'{"a": {"b": {"c": {"d": 1}}}}', True, id="nested-deep"),
    P({"employees": {"firstName": ["Anna"]}}, EMPLOYEES, True, id="array-of-objects"),
    P({"employees": {"firstName": ["Anna"], "lastName": ["Smith"]}}, EMPLOYEES, True, id="same-element"),
    P(
        {"employees": {"firstName": ["Anna"], "lastName": ["Jones"]}},
        EMPLOYEES,
        False,
        id="not-across-elements",
    ),
    P(NO_C_COUNT, b'{"detail": {"state": "x"}}', True, id="exists-false-nested"),
    P(NO_C_COUNT, b'{"detail": {"c-count": {"c1": 100}}}', True, id="exists-only-on-leaves"),
    P(STORE_EXISTS, b'{"store": "fans"}', True, id="exists-true"),
    P(STORE_EXISTS, b'{"store": null}', False, id="exists-true-needs-non-null"),
    P(STORE_ABSENT, b'{"customer_interests": ["baseball"]}', True, id="exists-false"),
    P(STORE_ABSENT, b"{}", False, id="exists-false-empty-body"),
    P({"a": [None]}, b'{"a": null}', True, id="null"),
    P({"a": [None]}, b'{"a": "null"}', False, id="null-is-not-the-string-null"),
    P({"a": [None]}, b'{"b": 1}', False, id="null-is-not-absent"),
    P({"encrypted": [False]}, b'{"encrypted": false}', True, id="false"),
    P({"encrypted": [False]}, b'{"encrypted": "false"}', False, id="false-is-not-the-string"),
    P(PARALLEL_OR, b'{"namespace": "AWS/EC2", "detail": {"source": "aws.cloudwatch"}}', True, id="$or-par"),
    P(PARALLEL_OR, b'{"namespace": "AWS/EC2", "detail": {"source": "x"}}', False, id="$or-parallel-no"),
    P({"a": ["x"]}, b"not json", False, id="not-json"),
    P({"a": ["x"]}, b'["x"]', False, id="json-array-body"),
    P({"a": ["x"]}, b"\xff\xfe\x00", False, id="not-utf8"),
    P({"a": ["x"]}, None, False, id="no-body"),
    P({}, b"not json", True, id="empty-policy"),
]


@pytest.mark.parametrize(("policy", "body", "expected"), BODY_CASES)
def test_body_scope(policy: dict[str, Any], body: Any, expected: bool) -> None:
    validate(policy, scope="MessageBody")
    assert matches(policy, body=body, scope="MessageBody") is expected


def test_scopes_read_their_own_part_of_the_message() -> None:
    policy = {"store": ["example_corp"]}
    body = b'{"store": "other"}'
    assert matches(policy, {"store": "example_corp"}, body) is True
    assert matches(policy, {"store": "example_corp"}, body, scope="MessageBody") is False


def _values(n: int) -> list[str]:
    return [f"v{i}" for i in range(n)]


INVALID = [
    P(["a"], None, "JSON object", id="not-an-object"),
    P({"a": "x"}, None, "must be an array", id="scalar-value"),
    P({"a": []}, None, "empty arrays", id="empty-array"),
    P({"a": [["x"]]}, None, "a value must be", id="nested-array"),
    P({"a": [float("nan")]}, None, "finite", id="nan"),
    P({1: ["x"]}, None, "keys must be strings", id="non-string-key"),
    P({"a": [{"contains": "x"}]}, None, "unknown operator 'contains'", id="unknown-operator"),
    P({"a": [{"prefix": "x", "suffix": "y"}]}, None, "exactly one key", id="two-operators-in-one"),
    P({"a": [{}]}, None, "exactly one key", id="empty-operator"),
    P({"a": [{"prefix": 5}]}, None, "takes a string", id="prefix-not-string"),
    P({"a": [{"equals-ignore-case": ["x"]}]}, None, "takes a string", id="equals-ignore-case-list"),
    P({"a": [{"exists": "true"}]}, None, "true or false", id="exists-not-bool"),
    P({"a": [{"numeric": ["!=", 5]}]}, None, "unknown comparison", id="numeric-bad-operator"),
    P({"a": [{"numeric": [">", 5, "<"]}]}, None, "takes [op, number]", id="numeric-odd-length"),
    P({"a": [{"numeric": 5}]}, None, "takes [op, number]", id="numeric-not-list"),
    P({"a": [{"numeric": [">", "5"]}]}, None, "takes numbers", id="numeric-string-bound"),
    P({"a": [{"numeric": [">", True]}]}, None, "takes numbers", id="numeric-bool-bound"),
    P({"a": [{"numeric": ["<", 5, ">", 0]}]}, None, "lower bound", id="numeric-range-reversed"),
    P({"a": [{"numeric": ["=", 5, "<", 10]}]}, None, "lower bound", id="numeric-equals-in-range"),
    P({"a": [{"numeric": [">", 10, "<", 5]}]}, None, "not below", id="numeric-empty-range"),
    P({"a": [{"numeric": [">", 2e9]}]}, None, "outside -1e9..1e9", id="numeric-out-of-range"),
    P({"a": [{"anything-but": ["x", 1]}]}, None, "takes a string, a number", id="anything-but-mixed"),
    P({"a": [{"anything-but": []}]}, None, "takes a string, a number", id="anything-but-empty"),
    P({"a": [{"anything-but": None}]}, None, "takes a string, a number", id="anything-but-null"),
    P({"a": [{"anything-but": True}]}, None, "takes a string, a number", id="anything-but-bool"),
    P({"a": [{"anything-but": {"numeric": [">", 1]}}]}, None, "unsupported operator", id="ab-numeric"),
    P({"a": [{"anything-but": {"prefix": ""}}]}, None, "must not be empty", id="anything-but-empty-prefix"),
    P({"a": [{"wildcard": "a**b"}]}, None, "consecutive", id="wildcard-double-star"),
    P({"a": [{"wildcard": "a\\b"}]}, None, "backslash", id="wildcard-bad-escape"),
    P({"a": [{"cidr": "10.0.0.0/33"}]}, None, "not an IP network", id="cidr-bad"),
    P({"$or": [{"a": ["x"]}]}, None, "at least 2 objects", id="$or-one-branch"),
    P({"$or": {"a": ["x"]}}, None, "at least 2 objects", id="$or-not-a-list"),
    P({"$or": [{"a": ["x"]}, "b"]}, None, "at least 2 objects", id="$or-non-object-branch"),
    P({"$or": [{}, {"a": ["x"]}]}, None, "empty objects", id="$or-empty-branch"),
    P({"$or": [{"prefix": ["x"]}, {"b": ["y"]}]}, None, "operator name", id="$or-operator-as-key"),
    P({"a": {"b": ["x"]}}, ATTRS, "nested policies need scope MessageBody", id="nested-in-attrs"),
    P({"a": {}}, "MessageBody", "empty objects", id="empty-nested-object"),
    # subscription-filter-policy-constraints.html: 150 combinations, 5 keys
    P({"a": _values(151)}, None, "too many combinations: 151", id="151-values"),
    P({"a": _values(10), "b": _values(10), "c": _values(2)}, None, "combinations: 200", id="10x10x2"),
    P({"$or": [{"a": _values(100)}, {"b": _values(51)}]}, None, "too many combinations: 151", id="$or-sum"),
    P({k: ["x"] for k in "abcdef"}, "MessageAttributes", "too many keys", id="six-keys"),
    P({k: {"n": ["x"]} for k in "abcdef"}, "MessageBody", "too many keys", id="six-top-level-body-keys"),
]


@pytest.mark.parametrize(("policy", "scope", "message"), INVALID)
def test_validate_rejects(policy: Any, scope: Any, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        validate(policy, scope=scope)
    assert message in str(err.value)


VALID = [
    P({}, "MessageAttributes", id="empty-policy"),
    P(EXAMPLE_ACCEPTS, "MessageAttributes", id="example"),
    P(NESTED_OR, "MessageAttributes", id="nested-$or"),
    P(PARALLEL_OR, "MessageBody", id="parallel-$or-in-body"),
    P({"a": {"b": ["x"]}}, None, id="nested-without-scope"),
    P({"prefix": ["x"], "exists": [{"exists": True}]}, "MessageAttributes", id="operator-names-as-keys"),
    P({"a": _values(15), "b": _values(10)}, "MessageAttributes", id="exactly-150-combinations"),
    P({k: ["x"] for k in "abcde"}, "MessageAttributes", id="five-keys"),
    # constraints page: in payload-based filtering only top-level keys count
    P({"a": {k: ["x"] for k in "bcdefgh"}}, "MessageBody", id="nested-keys-do-not-count"),
    P({"$or": [{k: ["x"] for k in "abcde"}, {k: ["x"] for k in "fghij"}]}, ATTRS, id="5-keys-each"),
    P({"a": [{"numeric": [">=", -1e9, "<", 1e9]}, 5, "x", True, None]}, ATTRS, id="mixed-values"),
    P({"a": [{"anything-but": {"equals-ignore-case": ["x", "y"]}}]}, ATTRS, id="anything-but-eic"),
    P({"a": [{"wildcard": "a\\\\b\\**"}, {"cidr": "::1/128"}]}, "MessageAttributes", id="wildcard-cidr"),
]


@pytest.mark.parametrize(("policy", "scope"), VALID)
def test_validate_accepts(policy: dict[str, Any], scope: Any) -> None:
    validate(policy, scope=scope)
    unrelated = {"z": "unrelated"}
    if scope == "MessageAttributes":
        assert matches(policy, unrelated) is (policy == {})
    else:
        assert matches(policy, body=unrelated, scope="MessageBody") is False


def test_fleet_config_rejects_a_bad_filter() -> None:
    with pytest.raises(ValidationError, match="invalid filter policy"):
        QueueConfig(name="bad", filter={"sd_model_checkpoint": []})
    assert QueueConfig(name="good", filter=EXAMPLE_ACCEPTS).filter == EXAMPLE_ACCEPTS


def test_policy_error_is_a_value_error_and_scope_is_checked() -> None:
    assert issubclass(PolicyError, ValueError)
    with pytest.raises(PolicyError, match="unknown filter policy scope"):
        matches({"a": ["x"]}, {"a": "x"}, scope="Body")  # type: ignore[arg-type]


SD15 = "v1-5-pruned-emaonly.safetensors"
# DESIGN.md fleet config: a dedicated queue, the dynamic rest, a tenant tier, plus edge cases
SUBSCRIPTIONS = [
    Subscription(topic="tasks", queue="sd15", filter_policy={"sd_model_checkpoint": [SD15]}),
    Subscription(
        topic="tasks", queue="dynamic", filter_policy={"sd_model_checkpoint": [{"anything-but": [SD15]}]}
    ),
    Subscription(topic="tasks", queue="paid", filter_policy={"tenant_tier": ["paid"]}),
    Subscription(topic="results", queue="results", filter_policy=None),
    Subscription(
        topic="tasks",
        queue="big",
        filter_policy={"params": {"width": [{"numeric": [">=", 1024]}]}},
        scope="MessageBody",
    ),
    Subscription(topic="tasks", queue="paid", filter_policy={"tenant_tier": ["paid", "trial"]}),
    Subscription(topic="tasks", queue="audit", filter_policy=None),
]

ROUTES = [
    P({"sd_model_checkpoint": SD15}, b"{}", ["sd15", "audit"], id="dedicated-queue"),
    P({"sd_model_checkpoint": "sdxl.safetensors"}, b"{}", ["dynamic", "audit"], id="dynamic-queue"),
    P({"tenant_tier": "paid"}, b"{}", ["paid", "audit"], id="paid-listed-once"),
    P({"sd_model_checkpoint": SD15, "tenant_tier": "paid"}, b"{}", ["sd15", "paid", "audit"], id="fan-out"),
    P({}, b'{"params": {"width": 2048}}', ["big", "audit"], id="body-scope"),
    P({}, b'{"params": {"width": 512}}', ["audit"], id="body-scope-no"),
    P({"tenant_tier": "trial"}, b"not json", ["paid", "audit"], id="non-json-body-skips-body-scope"),
]


@pytest.mark.parametrize(("attributes", "body", "expected"), ROUTES)
def test_matching_queues(attributes: dict[str, str], body: bytes, expected: list[str]) -> None:
    assert matching_queues(SUBSCRIPTIONS, "tasks", attributes, body) == expected


def test_matching_queues_other_topic_and_none() -> None:
    assert matching_queues(SUBSCRIPTIONS, "results", {}, b"") == ["results"]
    assert matching_queues(SUBSCRIPTIONS, "nobody", {"a": "b"}, b"{}") == []
    assert matching_queues([], "tasks", {}, b"") == []
