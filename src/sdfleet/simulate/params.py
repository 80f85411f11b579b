"""Simulation parameters: KEDA/HPA, the agent's stages, Karpenter's nodes, resolution.

Defaults are the chart's defaults (``deploy/helm/sdfleet/values.yaml``) for scaling and Karpenter,
and figures measured on the real agent for its stages (docs/simulate.md says where each comes
from). A params file (YAML) overrides any of them, globally or per queue::

    keda: {cooldown_s: 120}
    agent: {max_batch: 4, finish_concurrency: 4}
    nodes: {gpu: a10g, interruptions_per_node_hour: 0.05}
    queues:
      sd15: {keda: {min_replicas: 1}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdfleet.agent.pace import ahead_limit
from sdfleet.errors import ConfigError, cannot_read, one_line

M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Policy(_Strict):
    """One HPA scaling policy: at most ``value`` pods (or percent) changed per ``period_s``."""

    type: Literal["Pods", "Percent"]
    value: int = Field(ge=1)
    period_s: float = Field(gt=0)


class Rules(_Strict):
    """HPA ``behavior.scaleUp`` / ``scaleDown``."""

    stabilization_s: float = Field(0.0, ge=0)
    policies: list[Policy] = Field(default_factory=list)
    select: Literal["Max", "Min", "Disabled"] = "Max"


def _up() -> Rules:
    return Rules(stabilization_s=0, policies=[Policy(type="Pods", value=4, period_s=15)])


def _down() -> Rules:
    return Rules(stabilization_s=120, policies=[Policy(type="Pods", value=1, period_s=60)])


class KedaParams(_Strict):
    """A queue's ScaledObject and the HPA KEDA makes for it (chart defaults)."""

    polling_s: float = Field(1.0, gt=0)
    """``pollingInterval``: how often KEDA checks activation (0 ↔ 1 replicas)."""
    cooldown_s: float = Field(60.0, ge=0)
    """``cooldownPeriod``: inactive this long before scaling to zero."""
    activation: int = Field(0, ge=0)
    """``activationQueueLength``: active only while the metric is greater than this."""
    scale_on_in_flight: bool = True
    """Metric = visible + in flight (KEDA's aws-sqs-queue default); false: visible only."""
    hpa_sync_s: float = Field(15.0, gt=0)
    """``--horizontal-pod-autoscaler-sync-period`` of the cluster (default 15 s)."""
    tolerance: float = Field(0.1, ge=0)
    scale_up: Rules = Field(default_factory=_up)
    scale_down: Rules = Field(default_factory=_down)
    min_replicas: int | None = Field(None, ge=0)
    """Overrides the fleet file's ``scaling.min``."""
    max_replicas: int | None = Field(None, ge=1)
    target_backlog: int | None = Field(None, ge=1)


class AgentParams(_Strict):
    """The agent's stages. Defaults: the shipped agent's (``agent.prefetch`` 4 on a runtime that
    takes one job at a time, receives of up to 10, ``agent.finishers`` 4), costs fitted on redis."""

    prefetch: int = Field(4, ge=0)
    """Tasks received ahead of the GPU (the buffer the runner picks from)."""
    prefetch_horizon_s: float = Field(30.0, ge=0)
    """... but no more than the GPU starts within this many seconds at the seconds per request
    seen so far (one call's worth until then), as ``agent.prefetch_horizon_s``; 0: ``prefetch``."""
    receive_max: int = Field(10, ge=1)
    """Messages per receive call (SQS allows 10)."""
    receive_s: float = Field(0.002, ge=0)
    prepare_s: float = Field(0.003, ge=0)
    """Per task, before it can run: decode, record, input fetch."""
    run_overhead_s: float = Field(0.0, ge=0)
    """Per runtime call on top of GPU time (HTTP and JSON for the server runtimes)."""
    finish_s: float = Field(0.01, ge=0)
    """Per task after its run: encode, upload, record, notify, ack."""
    finish_s_samples: list[float] = Field(default_factory=list)
    """Measured ``finish_s`` per replica, given to a queue's replicas in the order they start (then
    ``finish_s``): how the calibration replays agents that ran at different speeds (exact mode)."""
    finish_concurrency: int = Field(4, ge=0)
    """K: at most K tasks finishing at once while the GPU runs the next (the staged agent);
    0: finishing is serial with running (the agent before issue 10)."""
    max_batch: int = Field(1, ge=1)
    max_batch_wait_s: float = Field(0.0, ge=0)
    model_aware: bool = False
    pass_over_s: float = Field(30.0, ge=0)
    """Longest a received task may be passed over for another model's (model-aware order)."""
    cache_size: int | None = Field(None, ge=1)
    """Pipelines kept loaded; default the fleet's ``models.cache_size``."""
    switch_cached_s: float = Field(0.2, ge=0)
    model_load_s: float = Field(15.0, ge=0)
    """Load a model that is not in the cache (also the first model at start)."""
    drain_s: float = Field(30.0, ge=0)
    """On SIGTERM, how long the running batch may finish before it is released."""

    def ahead(self, per_task_s: float | None) -> int:
        """Requests a replica holds received ahead of its GPU (the agent's rule, ``agent.pace``)."""
        cap = max(self.prefetch, self.max_batch)
        return ahead_limit(cap, self.max_batch, self.prefetch_horizon_s or None, per_task_s)


class Shortage(_Strict):
    """A window with at most ``max_nodes`` spot nodes to be had."""

    start_s: float = Field(ge=0)
    end_s: float = Field(gt=0)
    max_nodes: int = Field(ge=0)


class NodeParams(_Strict):
    """Karpenter's GPU NodePools: spot preferred, on-demand fallback (chart defaults)."""

    enabled: bool = True
    """False: a GPU is free for every pod at once (a fixed cluster; the calibration)."""
    gpu: str = "h200"
    gpus_per_node: int = Field(1, ge=1)
    batch_idle_s: float = Field(1.0, ge=0)
    batch_max_s: float = Field(10.0, ge=0)
    launch_s: float = Field(60.0, ge=0)
    """From the NodeClaim to a Ready node."""
    image_pull_s: float = Field(90.0, ge=0)
    """Worker image on a fresh node (0 with a pre-pulled data-volume snapshot)."""
    pod_start_s: float = Field(5.0, ge=0)
    """Container start to agent ready, model load excluded."""
    pod_start_samples: list[float] = Field(default_factory=list)
    """Measured start times, given to a queue's pods in the order they are created (then
    ``pod_start_s``): how the calibration replays the starts it saw."""

    consolidate_after_s: float = Field(60.0, ge=0)
    spot: bool = True
    on_demand_fallback: bool = True
    fallback_delay_s: float = Field(5.0, ge=0)
    spot_max_nodes: int | None = Field(None, ge=0)
    shortages: list[Shortage] = Field(default_factory=list)
    interruptions_per_node_hour: float = Field(0.0, ge=0)
    notice_s: float = Field(120.0, ge=0)
    termination_grace_s: float = Field(60.0, ge=0)
    """The worker pod's grace period (chart: drain + 30 s margin)."""


class QueueOverride(_Strict):
    keda: dict[str, Any] = Field(default_factory=dict)
    agent: dict[str, Any] = Field(default_factory=dict)


class SimParams(_Strict):
    keda: KedaParams = Field(default_factory=KedaParams)
    agent: AgentParams = Field(default_factory=AgentParams)
    nodes: NodeParams = Field(default_factory=NodeParams)
    queues: dict[str, QueueOverride] = Field(default_factory=dict)
    models: dict[str, str] = Field(default_factory=dict)
    """Model name → family of the performance table (default: sdxl when the name says xl)."""
    resolution_s: float | Literal["auto"] = "auto"
    """0: every request and every replica's stages are events (exact mode); > 0: arrivals binned
    this wide and each queue's replicas served as one fluid per bin (aggregate mode). auto: exact
    up to 200,000 requests, else 1 s."""
    sample_s: float | None = Field(None, gt=0)
    """Time-series step of the plots (default: the horizon / 720, at least 1 s)."""
    drain_after_s: float = Field(3600.0, ge=0)
    """Simulated time after the last arrival for the fleet to finish."""
    seed: int = 0

    def keda_for(self, queue: str) -> KedaParams:
        return _merged(KedaParams, self.keda, self._override(queue).keda)

    def agent_for(self, queue: str) -> AgentParams:
        return _merged(AgentParams, self.agent, self._override(queue).agent)

    def _override(self, queue: str) -> QueueOverride:
        return self.queues.get(queue, QueueOverride())


def _merged(cls: type[M], base: BaseModel, update: dict[str, Any]) -> M:
    try:
        return cls.model_validate({**base.model_dump(), **update})
    except ValidationError as e:
        raise ConfigError(f"simulation parameters: {one_line(e)}") from e


def load_params(path: Path | None, overrides: dict[str, Any] | None = None) -> SimParams:
    """Parameters from a YAML file (None: defaults), with ``overrides`` merged on top (one level
    deep per section). Raises ``ConfigError`` on an unreadable file or a bad value."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise cannot_read("simulation parameters", path, e) from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a mapping of sections is expected")
    for section, values in (overrides or {}).items():
        current = raw.get(section)
        raw[section] = (
            {**current, **values} if isinstance(current, dict) and isinstance(values, dict) else values
        )
    try:
        return SimParams.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"simulation parameters: {one_line(e)}") from e
