"""Which trace a request or a delivery continues: W3C ``traceparent`` first, then an X-Ray header
(``X-Amzn-Trace-Id``, SQS ``AWSTraceHeader``), else a new trace."""

from __future__ import annotations

import json

import pytest
from opentelemetry import trace
from opentelemetry.context import Context

from sdfleet.agent.prepare import trace_context
from sdfleet.bus.base import Delivery
from sdfleet.compat import sns
from sdfleet.telemetry import extract, xray_trace_id

ROOT = "5759e988bd862e3fe1be46a994272793"
XRAY = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
W3C = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _parent(ctx: Context) -> tuple[str, str, bool] | None:
    sc = trace.get_current_span(ctx).get_span_context()
    if not sc.is_valid:
        return None
    return format(sc.trace_id, "032x"), format(sc.span_id, "016x"), sc.trace_flags.sampled


@pytest.mark.parametrize(
    ("carrier", "expected"),
    [
        ({"X-Amzn-Trace-Id": XRAY}, (ROOT, "53995c3f42cd8ad8", True)),
        ({"x-amzn-trace-id": XRAY.replace("Sampled=1", "Sampled=0")}, (ROOT, "53995c3f42cd8ad8", False)),
        ({"AWSTraceHeader": XRAY + ";Lineage=a87bd80c:1|68fd508a:5"}, (ROOT, "53995c3f42cd8ad8", True)),
        ({"traceparent": W3C}, ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)),
        (
            {"traceparent": W3C, "X-Amzn-Trace-Id": XRAY},
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True),
        ),
        ({"traceparent": "garbage", "X-Amzn-Trace-Id": XRAY}, (ROOT, "53995c3f42cd8ad8", True)),
        # An ALB adds Root only: no parent to continue, a new trace.
        ({"X-Amzn-Trace-Id": "Root=1-5759e988-bd862e3fe1be46a994272793"}, None),
        ({"X-Amzn-Trace-Id": "Root=1-nonsense"}, None),
        ({}, None),
    ],
)
def test_extract_prefers_w3c_then_xray(
    carrier: dict[str, str], expected: tuple[str, str, bool] | None
) -> None:
    assert _parent(extract(carrier)) == expected


def _context(d: Delivery) -> Context:
    """The agent's: with the attributes its decode read (inside the envelope, if any)."""
    return trace_context(d, sns.open_envelope(d.body, d.attributes).attributes)


def _delivery(body: bytes, attributes: dict[str, str], system: dict[str, str]) -> Delivery:
    raw = {"Attributes": system, "Body": body.decode()}
    return Delivery("q", "m1", body, attributes, 1, "r1", 0.0, raw=raw)


def test_delivery_continues_its_sqs_trace_header() -> None:
    d = _delivery(b'{"schema": 1}', {}, {"AWSTraceHeader": XRAY, "ApproximateReceiveCount": "1"})
    assert _parent(_context(d)) == (ROOT, "53995c3f42cd8ad8", True)


def test_delivery_traceparent_inside_an_sns_envelope_wins() -> None:
    envelope = {
        "Type": "Notification",
        "MessageId": "6e3b8d2c",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:tasks",
        "Message": "{}",
        "MessageAttributes": {"traceparent": {"Type": "String", "Value": W3C}},
    }
    d = _delivery(json.dumps(envelope).encode(), {}, {"AWSTraceHeader": XRAY})
    assert _parent(_context(d))[0] == "4bf92f3577b34da6a3ce929d0e0e4736"  # type: ignore[index]


def test_only_sqs_says_awstraceheader() -> None:
    # a message attribute of that name is a producer's, not the X-Ray header SQS keeps
    d = _delivery(b"{}", {"AWSTraceHeader": XRAY}, {})
    assert _parent(_context(d)) is None


def test_xray_trace_id_format() -> None:
    assert xray_trace_id(int(ROOT, 16)) == "1-5759e988-bd862e3fe1be46a994272793"
