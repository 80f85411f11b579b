"""Defect 5 of issue 14: scale-in never costs a running task. The pod lifecycle is simulated with
the rendered worker pod: a real ``sdfleet agent`` process started with the container's args and
environment (Redis engine, synthetic runtime), the startup probe's ready file awaited, then what
the kubelet does when the HPA deletes the pod mid-task: SIGTERM, up to
``terminationGracePeriodSeconds``, SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from k8s_checks import CLUSTER, by_name, merge, pod_spec, render
from test_env_composition import resolve_env

from sdfleet.bus.backends.redis import RedisBus
from sdfleet.cli_ensure import ensure_topology
from sdfleet.deploy import chart_values
from sdfleet.routing import stamp, task_attributes
from sdfleet.settings import FleetConfig, Settings
from sdfleet.store.backends.redis import RedisTaskStore
from sdfleet.tasks import Task, TaskParams, TaskState

pytestmark = pytest.mark.timeout(90)
TASK_S = 3.0  # one generation
TIMEOUT_S = 6.0  # the queue's task_timeout_s


def _fleet(task_s: float = TASK_S) -> FleetConfig:
    return FleetConfig.model_validate(
        {
            "queues": [{"name": "q", "runtime": "synthetic", "task_timeout_s": TIMEOUT_S}],
            "runtimes": {"synthetic": {"latency_s": task_s}},
            "retry": {"lease_s": 30, "max_receives": 3},
        }
    )


def _pod(server: Any, prefix: str, old: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    fleet = _fleet(TIMEOUT_S + 4 if old else TASK_S)
    values = chart_values(fleet, engine="redis", prefix=prefix, redis_address=f"127.0.0.1:{server.port}")
    values["urls"]["bus"] = f"{server.url}?prefix={prefix}"
    values["urls"]["storage"] = f"s3://{prefix}-results/out"  # on moto_server (AWS_ENDPOINT_URL)
    if old:  # one fixed drain and grace, shorter than the task
        del values["queues"][0]["drainSeconds"]
        values["agent"] = {"drainSeconds": 1, "terminationMarginSeconds": 5}
    objs = render(merge(CLUSTER, values))
    return pod_spec(by_name(objs, "Deployment")["fleet-sdfleet-q"]), by_name(objs, "ConfigMap")[
        "fleet-sdfleet-fleet"
    ]


class Kubelet:
    """Runs the agent container as the kubelet would, paths mapped into a temporary folder."""

    def __init__(
        self,
        spec: dict[str, Any],
        config_map: dict[str, Any],
        tmp: Path,
        pod: str = "fleet-sdfleet-q-5c7d9-x2x4z",
        api: dict[str, str] | None = None,
    ) -> None:
        """``api``: the API server the kubelet tells the pod about (``KUBERNETES_SERVICE_HOST``,
        ``_PORT``) and ``sa_dir``, where the service account volume is mounted for this process."""
        (self.container,) = spec["containers"]
        self.grace = spec["terminationGracePeriodSeconds"]
        self.name = pod
        (tmp / "etc").mkdir()
        (tmp / "etc" / "sdfleet.yaml").write_text(config_map["data"]["sdfleet.yaml"])
        self.ready_dir = tmp / "run"
        self.ready_dir.mkdir()
        paths = {
            "/etc/sdfleet/sdfleet.yaml": str(tmp / "etc" / "sdfleet.yaml"),
            "/run/sdfleet": str(self.ready_dir),
        }
        self.args = [paths.get(a, a) for a in self.container["args"]]
        fields = {"metadata.name": pod, "metadata.namespace": "sdfleet"}
        env = resolve_env(self.container, {"sdfleet-env": {}}, fields)
        env["SDFLEET_CONFIG_FILE"] = paths[env["SDFLEET_CONFIG_FILE"]]
        self.sa_dir = (api or {}).get("sa_dir")
        kube = {k: v for k, v in (api or {}).items() if k != "sa_dir"}
        self.env = {
            **os.environ,
            **env,
            **kube,
            "SDFLEET_LOG_JSON": "false",
            "PYTHONPATH": os.pathsep.join(sys.path),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        code = "from sdfleet.cli import main; main()"
        if self.sa_dir:  # the service account volume, mounted at this process's path
            code = f"import pathlib, sdfleet.pod_cost as c; c.SA_DIR = pathlib.Path({self.sa_dir!r}); {code}"
        self.proc = subprocess.Popen([sys.executable, "-c", code, *self.args], env=self.env)

    async def started(self) -> None:
        """The startup probe: ``test -f <ready-dir>/<queue>.ready``."""
        probe = self.container["startupProbe"]["exec"]["command"][-1].replace(
            "/run/sdfleet", str(self.ready_dir)
        )
        deadline = time.monotonic() + 40
        while not Path(probe).exists():
            assert self.proc is not None and self.proc.poll() is None, "agent exited before ready"
            assert time.monotonic() < deadline, "agent never became ready"
            await asyncio.sleep(0.1)

    async def delete_pod(self) -> tuple[int, float]:
        """SIGTERM, wait up to the grace period, then SIGKILL: (exit code, seconds it took)."""
        assert self.proc is not None and "lifecycle" not in self.container  # no preStop hook
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        while self.proc.poll() is None and time.monotonic() - began < self.grace:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(), time.monotonic() - began


async def _running_task(bus: RedisBus, store: RedisTaskStore) -> tuple[Task, Any]:
    """One task published as the API does, once an agent has started it: (task, its record)."""
    task = Task(runtime="synthetic", params=TaskParams(prompt="a lighthouse", width=64, height=64))
    await bus.publish("tasks", task.to_message(), stamp(task_attributes(task)))
    deadline = time.monotonic() + 20
    while (r := await store.get(task.tenant, task.id)) is None or r.state is not TaskState.RUNNING:
        assert time.monotonic() < deadline, "the task never started"
        await asyncio.sleep(0.05)
    return task, r


async def _scale_in_mid_task(server: Any, tmp: Path, old: bool) -> tuple[Any, ...]:
    prefix = f"scale{uuid.uuid4().hex[:6]}"
    spec, config_map = _pod(server, prefix, old)
    kubelet = Kubelet(spec, config_map, tmp)
    url = f"{server.url}?prefix={prefix}"
    await ensure_topology(Settings(bus_url=url, fleet=_fleet()))  # the chart's pre-install hook Job
    boto3.client("s3").create_bucket(Bucket=f"{prefix}-results")  # the CDK app's results bucket
    async with RedisBus.from_url(url) as bus, RedisTaskStore.from_url(url) as store:
        kubelet.start()
        try:
            await kubelet.started()
            task, _ = await _running_task(bus, store)
            await asyncio.sleep(0.5)  # mid-generation: the HPA picks this pod for scale-in
            code, took = await kubelet.delete_pod()
        finally:
            if kubelet.proc is not None and kubelet.proc.poll() is None:
                kubelet.proc.kill()
                kubelet.proc.wait()
        record = await store.get(task.tenant, task.id)
        stats = await bus.stats("q")
    return kubelet, code, took, record, stats


async def test_scale_in_waits_for_the_running_task(redis_server: Any, moto_url: str, tmp_path: Path) -> None:
    kubelet, code, took, record, stats = await _scale_in_mid_task(redis_server, tmp_path, False)
    drain = float(resolve_env(kubelet.container, {"sdfleet-env": {}})["SDFLEET_AGENT__DRAIN_S"])
    assert drain == TIMEOUT_S and kubelet.grace >= TIMEOUT_S + 5  # from the queue's task timeout
    assert code == 0 and took < kubelet.grace, "the agent exits on its own, before SIGKILL"
    assert record.state is TaskState.SUCCEEDED and record.attempts == 1, record
    assert (stats.visible, stats.in_flight, stats.delayed, stats.dead_letters) == (0, 0, 0, 0)


async def test_a_drain_shorter_than_the_task_costs_it(
    redis_server: Any, moto_url: str, tmp_path: Path
) -> None:
    """Control (the old chart: one fixed drain and grace, whatever the tasks take): the agent
    interrupts the task at the end of its drain (or the kubelet kills it); it starts over elsewhere."""
    kubelet, code, _took, record, stats = await _scale_in_mid_task(redis_server, tmp_path, True)
    assert kubelet.grace == 6 and code in (0, -signal.SIGKILL)
    assert record.state is not TaskState.SUCCEEDED and record.finished_at is None, record
    assert stats.in_flight + stats.visible + stats.delayed == 1, "the GPU time spent on it is lost"


def _replicaset_victims(costs: dict[str, int], n: int) -> list[str]:
    """The ``n`` pods a ReplicaSet deletes among running, ready pods on scale-in: lowest
    ``controller.kubernetes.io/pod-deletion-cost`` first (unset counts as 0); ties by name here,
    where Kubernetes goes on to readiness times and restarts."""
    return sorted(costs, key=lambda pod: (costs[pod], pod))[:n]


async def test_scale_in_deletes_the_idle_worker_not_the_busy_one(
    redis_server: Any, moto_url: str, tmp_path: Path
) -> None:
    """Two workers of the rendered Deployment, one task: the busy agent marks its pod, the idle one
    does not, and a scale-in from 2 to 1 takes the idle pod; the task finishes where it runs."""
    from fakes.kube_api import KubeApi, self_signed
    from fakes.servers import ServerThread, free_port

    prefix = f"cost{uuid.uuid4().hex[:6]}"
    spec, config_map = _pod(redis_server, prefix, False)
    sa = tmp_path / "sa"
    sa.mkdir()
    ca, cert, key = self_signed(tmp_path)
    (sa / "ca.crt").write_bytes(ca.read_bytes())
    (sa / "token").write_text("worker-token")
    kube = KubeApi(token="worker-token")
    port = free_port()
    server = ServerThread(kube.app(), port, tls=(cert, key)).start()
    api = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(port), "sa_dir": str(sa)}
    kubelets = []
    for pod in ("fleet-sdfleet-q-5c7d9-aaaaa", "fleet-sdfleet-q-5c7d9-bbbbb"):
        kube.add_pod("sdfleet", pod)
        (tmp_path / pod).mkdir()
        kubelets.append(Kubelet(spec, config_map, tmp_path / pod, pod=pod, api=api))
    url = f"{redis_server.url}?prefix={prefix}"
    await ensure_topology(Settings(bus_url=url, fleet=_fleet()))
    boto3.client("s3").create_bucket(Bucket=f"{prefix}-results")
    try:
        async with RedisBus.from_url(url) as bus, RedisTaskStore.from_url(url) as store:
            for k in kubelets:
                k.start()
            for k in kubelets:
                await k.started()
            task, r = await _running_task(bus, store)
            deadline = time.monotonic() + 20
            (busy,) = [k for k in kubelets if k.proc is not None and f"-{k.proc.pid}-" in (r.worker or "")]
            costs: dict[str, int] = {}
            while time.monotonic() < deadline:
                costs = {k.name: int(kube.cost("sdfleet", k.name) or 0) for k in kubelets}
                if costs[busy.name] == 1000:
                    break
                await asyncio.sleep(0.05)
            assert costs[busy.name] == 1000 and sorted(costs.values()) == [0, 1000], costs
            (victim,) = _replicaset_victims(costs, 1)  # the HPA: 2 → 1 replicas
            assert victim != busy.name
            (idle,) = [k for k in kubelets if k.name == victim]
            code, took = await idle.delete_pod()
            # an idle agent ends its wait for messages and exits, well within its grace
            assert code == 0 and took < idle.grace, "exited on its own, before SIGKILL"
            while (r := await store.get(task.tenant, task.id)) is not None and r.state is TaskState.RUNNING:
                assert time.monotonic() < deadline + 10
                await asyncio.sleep(0.1)
            assert r is not None and r.state is TaskState.SUCCEEDED and r.attempts == 1, r
            # The message is acked once the results topic has the outcome, a moment after the record.
            while (stats := await bus.stats("q")).in_flight and time.monotonic() < deadline + 10:
                await asyncio.sleep(0.1)
            assert (stats.visible, stats.in_flight, stats.delayed) == (0, 0, 0)
    finally:
        for k in kubelets:
            if k.proc is not None and k.proc.poll() is None:
                k.proc.kill()
                k.proc.wait()
        server.stop()
