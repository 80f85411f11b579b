"""A worker pod's deletion cost: busy pods ask the ReplicaSet to scale in their idle siblings first.

When the HPA lowers a Deployment's replicas, the ReplicaSet deletes the running pods with the
lowest ``controller.kubernetes.io/pod-deletion-cost`` annotation first (Kubernetes ≥ 1.22). An agent
that holds tasks sets its own pod's cost to ``BUSY_COST`` and an idle one to ``IDLE_COST``, so a
scale-in from N to M replicas takes idle workers whenever there are N − M of them; a busy pod that
is picked anyway (more busy pods than replicas to keep) still drains its tasks within the pod's
grace period (``agent.drain_s``, from the queue's ``task_timeout_s``).

The pod patches itself through the Kubernetes API with its service account (in-cluster config:
``KUBERNETES_SERVICE_HOST``/``_PORT``, the mounted token and CA; ``POD_NAME``/``POD_NAMESPACE``
from the downward API), which needs ``patch`` on ``pods`` in its namespace (the chart's Role).
A failed patch is logged and retried at the next change; tasks never wait on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
IDLE_COST = 0
BUSY_COST = 1000
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class PodRef:
    """Where the pod's API object is and how to reach the API server."""

    api_url: str
    namespace: str
    name: str
    token_file: Path
    ca_file: Path | None

    @classmethod
    def in_cluster(cls, sa_dir: Path | None = None) -> PodRef | None:
        """The pod this process runs in; None outside Kubernetes (no API server or pod name)."""
        sa_dir = sa_dir or SA_DIR
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        name = os.environ.get("POD_NAME")
        token = sa_dir / "token"
        if not (host and port and name and token.is_file()):
            return None
        namespace = os.environ.get("POD_NAMESPACE")
        if not namespace and (sa_dir / "namespace").is_file():
            namespace = (sa_dir / "namespace").read_text().strip()
        if not namespace:
            return None
        host = f"[{host}]" if ":" in host else host  # IPv6 service address
        ca = sa_dir / "ca.crt"
        return cls(f"https://{host}:{port}", namespace, name, token, ca if ca.is_file() else None)


class PodDeletionCost:
    """Sets the pod's deletion cost when the agent turns busy or idle (one PATCH per change)."""

    def __init__(self, pod: PodRef, *, timeout_s: float = 5.0) -> None:
        self.pod = pod
        verify: ssl.SSLContext | bool = True
        if pod.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(pod.ca_file))
        self._client = httpx.AsyncClient(base_url=pod.api_url, verify=verify, timeout=timeout_s)
        self._path = f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}"
        self.cost: int | None = None
        """The cost last written (None: not yet, or the last write failed)."""
        self._warned = False

    async def set_busy(self, busy: bool) -> None:
        cost = BUSY_COST if busy else IDLE_COST
        if cost == self.cost:
            return
        # The token is re-read each time: bound service account tokens are rotated on disk.
        token = self.pod.token_file.read_text().strip()
        patch = {"metadata": {"annotations": {ANNOTATION: str(cost)}}}
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"}
        try:
            r = await self._client.patch(self._path, json=patch, headers=headers)
            r.raise_for_status()
        except httpx.HTTPError as e:
            self.cost = None
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(
                level, "pod deletion cost of %s not set (%s): scale-in may pick this pod", self.pod.name, e
            )
            return
        self.cost = cost

    async def aclose(self) -> None:
        await self._client.aclose()


async def track(
    cost: PodDeletionCost,
    busy: Callable[[], bool],
    done: asyncio.Event,
    *,
    period_s: float = 0.5,
    idle_after_s: float = 2.0,
) -> None:
    """Keep the pod's cost in step with ``busy()`` until ``done``, then close ``cost``: busy at once,
    idle once the agent has held nothing for ``idle_after_s`` (a backlog's short gaps between tasks
    are not idleness)."""
    idle_since: float | None = None
    try:
        await cost.set_busy(busy())
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), period_s)
            except TimeoutError:
                pass
            now = time.monotonic()
            if busy():
                idle_since = None
                await cost.set_busy(True)
            else:
                idle_since = now if idle_since is None else idle_since
                if now - idle_since >= idle_after_s:
                    await cost.set_busy(False)
    finally:
        await cost.aclose()
