"""Pod deletion cost (defect 5 of issue 14): a busy agent's pod costs more to delete than an idle
one, so the ReplicaSet scales in idle workers first. Against a TLS server that answers the pod
PATCH as kube-apiserver does (tests/fakes/kube_api.py), and through a real agent on the embedded
engine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes.kube_api import KubeApi, self_signed
from fakes.servers import ServerThread, free_port
from sdfleet import pod_cost
from sdfleet.agent.loop import Agent
from sdfleet.build import Engines, agent_parts, make_runtime
from sdfleet.pod_cost import ANNOTATION, BUSY_COST, IDLE_COST, PodDeletionCost, PodRef
from sdfleet.routing import stamp, task_attributes
from sdfleet.settings import AgentSettings, FleetConfig, QueueConfig, Settings
from sdfleet.tasks import Task, TaskParams, TaskState

NS, POD, TOKEN = "sdfleet", "sdfleet-q-7d9f-abcde", "sa-token"


@pytest.fixture
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KubeApi]:
    """The API server on 127.0.0.1 over TLS, and this process set up as pod ``POD``."""
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    ca, cert, key = self_signed(tmp_path)
    (sa / "ca.crt").write_bytes(ca.read_bytes())
    (sa / "token").write_text(TOKEN + "\n")
    (sa / "namespace").write_text(NS)
    api = KubeApi(token=TOKEN)
    api.add_pod(NS, POD)
    port = free_port()
    server = ServerThread(api.app(), port, tls=(cert, key)).start()
    monkeypatch.setattr(pod_cost, "SA_DIR", sa)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
    monkeypatch.setenv("POD_NAME", POD)
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    try:
        yield api
    finally:
        server.stop()


def test_in_cluster_reads_the_downward_api_and_the_service_account(kube: KubeApi, tmp_path: Path) -> None:
    pod = PodRef.in_cluster()
    assert pod is not None
    assert (pod.namespace, pod.name, pod.ca_file) == (NS, POD, tmp_path / "serviceaccount" / "ca.crt")
    assert pod.api_url.startswith("https://127.0.0.1:")


def test_not_in_a_pod_without_pod_name_or_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.delenv("POD_NAME", raising=False)
    assert PodRef.in_cluster(tmp_path) is None
    monkeypatch.setenv("POD_NAME", POD)
    assert PodRef.in_cluster(tmp_path) is None, "no service account token mounted"
    (tmp_path / "token").write_text("t")
    monkeypatch.setenv("POD_NAMESPACE", NS)
    pod = PodRef.in_cluster(tmp_path)
    assert pod is not None and pod.api_url == "https://[fd00::1]:443" and pod.ca_file is None


async def test_cost_is_patched_once_per_change(kube: KubeApi) -> None:
    pod = PodRef.in_cluster()
    assert pod is not None
    cost = PodDeletionCost(pod)
    try:
        await cost.set_busy(True)
        assert kube.cost(NS, POD) == str(BUSY_COST)
        await cost.set_busy(True)
        await cost.set_busy(False)
        assert kube.cost(NS, POD) == str(IDLE_COST)
    finally:
        await cost.aclose()
    assert kube.patches == [
        (POD, {"metadata": {"annotations": {ANNOTATION: "1000"}}}),
        (POD, {"metadata": {"annotations": {ANNOTATION: "0"}}}),
    ]


async def test_a_refused_patch_is_logged_and_tried_again(
    kube: KubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    pod = PodRef.in_cluster()
    assert pod is not None
    kube.allowed = False  # no RBAC for pods
    cost = PodDeletionCost(pod)
    try:
        with caplog.at_level(logging.WARNING, logger="sdfleet.pod_cost"):
            await cost.set_busy(True)
        assert cost.cost is None and kube.cost(NS, POD) is None
        assert "403" in caplog.text and "scale-in may pick this pod" in caplog.text
        kube.allowed = True
        await cost.set_busy(True)
        assert kube.cost(NS, POD) == "1000"
    finally:
        await cost.aclose()


async def test_a_busy_agent_marks_its_pod_and_an_idle_one_unmarks_it(kube: KubeApi, tmp_path: Path) -> None:
    fleet = FleetConfig(
        queues=[QueueConfig(name="q", runtime="synthetic")], runtimes={"synthetic": {"latency_s": 1.5}}
    )
    agent_settings = AgentSettings(wait_s=0.5, pod_deletion_cost=True)
    settings = Settings(data_dir=tmp_path / "data", fleet=fleet, log_json=False, agent=agent_settings)
    engines = Engines(settings)
    await engines.ensure()
    parts = agent_parts(settings, engines, "q", make_runtime(settings, "q"))
    agent = Agent(parts)
    running = asyncio.create_task(agent.run())
    try:
        await _until(lambda: kube.cost(NS, POD) == "0", "an idle agent starts at cost 0")
        task = Task(params=TaskParams(prompt="a dog", width=64, height=64))
        await engines.bus.publish("tasks", task.to_message(), stamp(task_attributes(task)))
        await _until(lambda: kube.cost(NS, POD) == "1000", "busy while it holds the task")
        record = await engines.store.get(task.tenant, task.id)
        assert record is None or record.state is not TaskState.SUCCEEDED, "marked before the task ends"
        await _until(lambda: kube.cost(NS, POD) == "0", "idle again after the task", timeout=10)
        record = await engines.store.get(task.tenant, task.id)
        assert record is not None and record.state is TaskState.SUCCEEDED
    finally:
        agent.stop()
        await asyncio.wait_for(running, 20)
        await parts.fetcher.aclose()
        await engines.aclose()
    costs = [p[1]["metadata"]["annotations"][ANNOTATION] for p in kube.patches]
    assert costs == ["0", "1000", "0"], "one patch per change, none per poll"


async def _until(ok: object, what: str, timeout: float = 5.0) -> None:
    assert callable(ok)
    for _ in range(int(timeout / 0.05)):
        if ok():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(what)
