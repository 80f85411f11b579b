"""Traces as an AWS team reads them, through a real OTLP/HTTP receiver: ``sdfleet api`` and
``sdfleet agent`` in their own processes on the AWS engine (moto), exporting over OTLP.

- ``api.submit`` is the root of a submit's trace, with an X-Ray-compatible trace id, unless the
  client sent trace context (``X-Amzn-Trace-Id`` as API Gateway sends it, or ``traceparent``);
- the agent continues an SQS ``AWSTraceHeader`` (the seed's API Gateway → Lambda → SNS → SQS path);
- scrapes, probes and polls make no spans, and FastAPI's own telemetry adds no exporter even when
  the environment asks it to;
- each stage span lasts what the record's timings say; ``model.switch`` only on a real switch; a
  refused input leaves ``agent.task`` in ERROR.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import yaml

from conftest import free_port
from otlp_receiver import OtlpReceiver, Span
from sdfleet.bus.backends.aws_topology import queue_name
from seed_payloads import V1ALPHA2_T2I, lambda_message, sns_envelope

pytestmark = pytest.mark.timeout(180)

QUEUE = "sdruntime"
STAGES = {"queue.wait", "inputs.fetch", "pool.wait", "runtime.run", "storage.put", "notify"}
SDFLEET_SPANS = {"api.submit", "agent.task", "runtime.wait", "model.switch", "encode", *STAGES}
BODY = {"params": {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3}}


@dataclass
class TracedFleet:
    api: str
    receiver: OtlpReceiver
    queue_url: str
    agent_log: Path

    def spans_of(self, task_id: str, names: set[str]) -> dict[str, Span]:
        """The task's spans by name, once all of ``names`` arrived (each exactly once)."""

        def mine(spans: list[Span]) -> list[Span]:
            return [s for s in spans if s.task_id == task_id]

        spans = mine(self.receiver.wait_for(lambda all_: names <= {s.name for s in mine(all_)}))
        by_name = {s.name: s for s in spans}
        assert len(by_name) == len(spans), [s.name for s in spans]
        return by_name


def xray_header(sampled: int = 1) -> tuple[str, str, str]:
    """(header, trace id as 32 hex, parent span id): what API Gateway or a traced Lambda sends, with
    the Lineage Lambda adds."""
    root = f"{int(time.time()):08x}{secrets.token_hex(12)}"
    parent = secrets.token_hex(8)
    header = f"Root=1-{root[:8]}-{root[8:]};Parent={parent};Sampled={sampled};Lineage=a87bd80c:1|68fd508a:5"
    return header, root, parent


def _wait_http(url: str, procs: list[subprocess.Popen[bytes]], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args} exited with {p.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not up after {timeout_s}s")


def _wait_file(path: Path, procs: list[subprocess.Popen[bytes]], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        for p in procs:
            assert p.poll() is None, f"{p.args} exited with {p.returncode}"
        assert time.monotonic() < deadline, f"{path} not written after {timeout_s}s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fleet(moto_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TracedFleet]:
    tmp = tmp_path_factory.mktemp("traced")
    ns = f"t{uuid.uuid4().hex[:8]}"
    config = tmp / "sdfleet.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "queues": [{"name": QUEUE, "runtime": "synthetic", "model": "m-a"}],
                "runtimes": {"synthetic": {"latency_s": 0.05, "switch_latency_s": 0.05}},
                "models": {"dir": str(tmp / "models")},
            }
        )
    )
    port = free_port()
    aws = f"aws://?prefix={ns}-&region=us-east-1"
    with OtlpReceiver() as receiver:
        env = {
            **os.environ,
            "SDFLEET_CONFIG_FILE": str(config),
            "SDFLEET_BUS_URL": aws,
            "SDFLEET_STORE_URL": aws,
            "SDFLEET_STORAGE_URL": f"s3://{ns}-out/results?create=true&region=us-east-1",
            "SDFLEET_AGENT__WAIT_S": "1",
            "SDFLEET_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, not 5 s
            # What would make FastAPI >= 0.142 add its own exporters and HTTP spans: pinned off.
            "FASTAPI_OTEL_AUTO_CONFIGURE": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint.removesuffix("/v1/traces"),
        }
        cli = [sys.executable, "-c", "from sdfleet.cli import main; main()"]
        agent_log = tmp / "agent.log"
        with agent_log.open("wb") as log:
            procs = [
                subprocess.Popen([*cli, "api", "--port", str(port)], env=env, stderr=subprocess.DEVNULL),
                subprocess.Popen(
                    [*cli, "agent", "--queue", QUEUE, "--ready-dir", str(tmp)], env=env, stderr=log
                ),
            ]
            try:
                api = f"http://127.0.0.1:{port}"
                _wait_http(f"{api}/healthz", procs)
                _wait_file(tmp / f"{QUEUE}.ready", procs)
                url = boto3.client("sqs").get_queue_url(QueueName=queue_name(f"{ns}-", QUEUE))["QueueUrl"]
                yield TracedFleet(api, receiver, url, agent_log)
            finally:
                for p in procs:
                    p.send_signal(signal.SIGTERM)
                for p in procs:
                    try:
                        p.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()


def _finished(http: httpx.Client, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        view: dict[str, Any] = http.get(f"/v1/tasks/{task_id}").json()
        if view.get("state") in ("succeeded", "failed"):
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.1)


def _stages_under(agent: Span, spans: dict[str, Span]) -> None:
    for name in STAGES:
        assert spans[name].parent_id == agent.span_id, name
        assert spans[name].trace_id == agent.trace_id, name


def test_submit_is_the_root_with_an_xray_trace_id_and_scrapes_are_not_traced(fleet: TracedFleet) -> None:
    with httpx.Client(base_url=fleet.api, timeout=10) as http:
        for path in ("/metrics", "/healthz", "/readyz", "/v1/queues"):
            assert http.get(path).status_code == 200, path
        t0 = int(time.time())
        webp = {"params": {**BODY["params"], "output_format": "webp"}}  # one stage more: encode
        task_id = http.post("/v1/tasks", json=webp).json()["id"]
        assert _finished(http, task_id)["state"] == "succeeded"
        assert http.get("/metrics").status_code == 200
    spans = fleet.spans_of(task_id, {"api.submit", "agent.task", "encode", *STAGES})
    submit, agent = spans["api.submit"], spans["agent.task"]
    assert submit.parent_id == "", "no client context: api.submit is the root"
    assert (submit.service, agent.service) == ("sdfleet-api", "sdfleet-agent")
    assert agent.trace_id == submit.trace_id and agent.parent_id == submit.span_id
    assert t0 - 2 <= int(submit.trace_id[:8], 16) <= time.time() + 2, "X-Ray ids start with the time"
    _stages_under(agent, spans)
    assert spans["encode"].parent_id == agent.span_id
    received = fleet.receiver.spans
    assert {s.name for s in received} <= SDFLEET_SPANS, "only sdfleet's spans, no HTTP spans"
    assert len({s.span_id for s in received}) == len(received), "one exporter: no span twice"
    assert fleet.receiver.refused == [], "FastAPI exported metrics or logs of its own"


def test_api_continues_the_trace_a_client_sent(fleet: TracedFleet) -> None:
    header, root, parent = xray_header()
    unsampled, unsampled_root, _ = xray_header(sampled=0)
    w3c_trace, w3c_parent = secrets.token_hex(16), secrets.token_hex(8)
    with httpx.Client(base_url=fleet.api, timeout=10) as http:
        seed = {"task": {**V1ALPHA2_T2I["task"], "metadata": {**V1ALPHA2_T2I["task"]["metadata"]}}}
        seed["task"]["metadata"]["id"] = f"gw-{uuid.uuid4().hex[:8]}"
        seed["task"]["content"] = {**seed["task"]["content"], "width": 64, "height": 64, "steps": 2}
        r = http.post("/v1alpha2/", json=seed, headers={"X-Amzn-Trace-Id": header})
        assert r.status_code == 200, r.text
        dropped = http.post("/v1/tasks", json=BODY, headers={"X-Amzn-Trace-Id": unsampled}).json()["id"]
        w3c = http.post(
            "/v1/tasks", json=BODY, headers={"traceparent": f"00-{w3c_trace}-{w3c_parent}-01"}
        ).json()["id"]
        for task_id in (r.json()["id"], dropped, w3c):
            assert _finished(http, task_id)["state"] == "succeeded"
    spans = fleet.spans_of(r.json()["id"], {"api.submit", "agent.task", *STAGES})
    assert (spans["api.submit"].trace_id, spans["api.submit"].parent_id) == (root, parent)
    assert spans["agent.task"].trace_id == root
    assert spans["agent.task"].parent_id == spans["api.submit"].span_id
    _stages_under(spans["agent.task"], spans)
    later = fleet.spans_of(w3c, {"api.submit", "agent.task"})
    assert (later["api.submit"].trace_id, later["api.submit"].parent_id) == (w3c_trace, w3c_parent)
    assert later["agent.task"].trace_id == w3c_trace
    # API Gateway sampled the request out (Sampled=0): sdfleet follows that decision.
    assert not [s for s in fleet.receiver.spans if s.task_id == dropped or s.trace_id == unsampled_root]


def test_agent_continues_the_seed_lambda_path_trace(fleet: TracedFleet) -> None:
    header, root, parent = xray_header()
    task = {**V1ALPHA2_T2I["task"], "metadata": {**V1ALPHA2_T2I["task"]["metadata"]}}
    task["metadata"]["id"] = f"seed-{uuid.uuid4().hex[:8]}"
    task["content"] = {**task["content"], "width": 64, "height": 64, "steps": 2}
    message, attributes = lambda_message("v1alpha2", {"task": task})
    # What SQS holds after the seed's Lambda (active tracing) published to SNS (active tracing),
    # subscribed without raw delivery: the SNS envelope, and the X-Ray header as a system attribute.
    boto3.client("sqs").send_message(
        QueueUrl=fleet.queue_url,
        MessageBody=sns_envelope(message, attributes).decode(),
        MessageSystemAttributes={"AWSTraceHeader": {"DataType": "String", "StringValue": header}},
    )
    task_id = task["metadata"]["id"]
    spans = fleet.spans_of(task_id, {"agent.task", *STAGES})
    agent = spans["agent.task"]
    assert (agent.trace_id, agent.parent_id) == (root, parent), "the Lambda's segment is the parent"
    _stages_under(agent, spans)
    lines = [json.loads(x) for x in fleet.agent_log.read_text().splitlines() if x.startswith("{")]
    story = [x for x in lines if x.get("task_id") == task_id and x.get("logger") == "sdfleet.agent.task"]
    assert [x["event"] for x in story] == ["received", "started", "succeeded"], story
    assert {x["trace_id"] for x in story} == {root}
    assert {x["xray_trace_id"] for x in story} == {f"1-{root[:8]}-{root[8:]}"}


def _seconds(span: Span) -> float:
    return (span.end_ns - span.start_ns) / 1e9


def test_stage_spans_last_what_the_records_say(fleet: TracedFleet) -> None:
    with httpx.Client(base_url=fleet.api, timeout=10) as http:
        views = []
        for model in ("m-b", "m-b"):  # the agent has m-a loaded: the first switches, not the second
            task_id = http.post("/v1/tasks", json={**BODY, "model": model}).json()["id"]
            views.append(_finished(http, task_id))
        params = {**BODY["params"], "init_images": ["s3://no-such-bucket/k.png"]}  # no input bucket allowed
        refused = http.post("/v1/tasks", json={"type": "image-to-image", "params": params}).json()["id"]
        assert _finished(http, refused)["state"] == "failed"
    first, second = (fleet.spans_of(v["id"], {"agent.task", *STAGES}) for v in views)
    switch, run = first["model.switch"], first["runtime.run"]
    assert switch.parent_id == first["agent.task"].span_id and switch.end_ns <= run.start_ns
    assert "model.switch" not in second and "model_switch" not in views[1]["timings"]
    for view, spans in zip(views, (first, second), strict=True):
        timings = view["timings"]
        for stage in ("pool_wait", "model_switch", "runtime_run", "storage_put", "inputs_fetch"):
            if stage in timings:
                assert abs(_seconds(spans[stage.replace("_", ".")]) - timings[stage]) < 0.003, stage
        assert timings["gpu_seconds"] == pytest.approx(
            timings.get("model_switch", 0) + timings["runtime_run"]
        )
    bad = fleet.spans_of(refused, {"agent.task", "queue.wait", "inputs.fetch"})
    assert bad["agent.task"].status == 2, "a refused input fails the task: agent.task is ERROR"
    assert "runtime.run" not in bad
