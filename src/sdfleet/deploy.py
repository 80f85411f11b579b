"""Chart values from the fleet file: what ``sdfleet deploy values`` prints for ``deploy/helm/sdfleet``.

The queue URLs (aws) and stream/consumer-group names (redis) the KEDA triggers watch come from the
same functions the bus engines use (``queue_name``, ``stream_names``), so scalers cannot drift from
the queues the agents read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml

from sdfleet.bus.backends.aws_topology import queue_name
from sdfleet.errors import ConfigError, cannot_read
from sdfleet.settings import FleetConfig, QueueConfig

Engine = Literal["aws", "redis"]

DEFAULT_PREFIX: dict[str, str] = {"aws": "sdfleet-", "redis": "sdfleet"}
"""The engines' own default prefixes (``aws://`` and ``redis://`` URLs without ``prefix``)."""

SIDECAR_PORTS: dict[str, int] = {"a1111": 7860, "comfyui": 8188}
"""Runtimes that run as a side-car container, and the port the chart gives them (``runtimes.<name>.port``)."""

MODELS_MOUNT = "/models"

_REGION = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-[0-9]$")
_ACCOUNT = re.compile(r"^[0-9]{12}$")


def sqs_queue_url(region: str, account: str, name: str) -> str:
    """The URL of SQS queue ``name`` (as ``GetQueueUrl`` answers it for a standard AWS partition)."""
    if not _REGION.match(region):
        raise ConfigError(f"{region!r} is not an AWS region")
    if not _ACCOUNT.match(account):
        raise ConfigError(f"{account!r} is not a 12-digit AWS account id")
    return f"https://sqs.{region}.amazonaws.com/{account}/{name}"


def _trigger(
    engine: Engine, prefix: str, queue: str, region: str | None, account: str | None
) -> dict[str, str]:
    if engine == "aws":
        if not region or not account:
            raise ConfigError("the aws engine needs --region and --account for the SQS queue URLs")
        return {"queueURL": sqs_queue_url(region, account, queue_name(prefix, queue))}
    # Imported here: the Redis bus module needs the redis extra, the aws path must not.
    from sdfleet.bus.backends.redis import stream_names

    stream, group = stream_names(prefix, queue)
    return {"stream": stream, "consumerGroup": group}


def _queue_values(q: QueueConfig, trigger: dict[str, str]) -> dict[str, Any]:
    return {
        "name": q.name,
        "runtime": q.runtime,
        # The whole task on scale-in: SIGTERM lets the running task finish (the API caps tasks
        # at task_timeout_s), and the pod's grace period is this plus the chart's margin.
        "drainSeconds": q.task_timeout_s,
        "scaling": {
            "minReplicaCount": q.scaling.min,
            "maxReplicaCount": q.scaling.max,
            "targetBacklog": q.scaling.target_backlog,
        },
        "trigger": trigger,
    }


def _fleet_for_pods(fleet: FleetConfig) -> dict[str, Any]:
    """The fleet file as the pods read it: models on the models volume, side-car runtimes on localhost."""
    data = fleet.model_dump(mode="json")
    data["models"]["dir"] = MODELS_MOUNT
    runtimes: dict[str, dict[str, Any]] = data["runtimes"]
    for q in fleet.queues:
        port = SIDECAR_PORTS.get(q.runtime)
        if port is not None:
            runtimes.setdefault(q.runtime, {}).setdefault("url", f"http://127.0.0.1:{port}")
    return data


REDIS_ADDRESS = re.compile(r"^[^\s/@?#]+:([0-9]{1,5}|\$\{Token\[[^\]]+\]\})$")
"""``host:port`` (``[::1]:6379`` too), as KEDA's trigger and the pods' bus URL both take it; the
chart's values schema holds the same pattern. The CDK app's port is a token until deployment."""


def _bus_url(engine: Engine, prefix: str, region: str | None, account: str | None, redis: str | None) -> str:
    if engine == "aws":
        return f"aws://?prefix={prefix}&region={region}&account={account}"
    # A Redis URL with a password belongs in the chart's existingSecret, not here.
    return f"redis://{redis}/0?prefix={prefix}" if redis else ""


def chart_values(
    fleet: FleetConfig,
    *,
    engine: Engine,
    prefix: str | None = None,
    region: str | None = None,
    account: str | None = None,
    redis_address: str | None = None,
    redis_password_secret: str | None = None,
    storage_url: str | None = None,
    drain_s: float = 30.0,
) -> dict[str, Any]:
    """Values for ``deploy/helm/sdfleet``: engine, bus URL, the fleet file and one entry per queue.

    ``prefix`` defaults to the engine's own default. ``redis_password_secret`` (``name`` or
    ``name:key``) is the Secret of the Redis password: KEDA and the pods both read it, the chart
    writes it into the Redis URLs. With the redis engine the chart's ``ensureJob`` creates the
    topology before agents start. Raises ``ConfigError`` on a missing region or account (aws) or
    Redis address (redis), a queue name the engine refuses, or a storage URL the pods cannot share.
    """
    if engine not in DEFAULT_PREFIX:
        raise ConfigError(f"unknown engine {engine!r}: aws or redis")
    if engine == "redis" and not redis_address:
        # Without it the values render an empty bus URL and a KEDA trigger with no address.
        raise ConfigError("the redis engine needs the Redis address (--redis-address host:port)")
    if redis_address and not REDIS_ADDRESS.match(redis_address):
        # KEDA's redis-streams scaler dials the address as given: no port is no connection.
        raise ConfigError(f"--redis-address {redis_address!r}: host:port, e.g. redis-master.redis:6379")
    prefix = DEFAULT_PREFIX[engine] if prefix is None else prefix
    queues = [_queue_values(q, _trigger(engine, prefix, q.name, region, account)) for q in fleet.queues]
    urls = {"bus": _bus_url(engine, prefix, region, account, redis_address)}
    if storage_url is not None:
        if not storage_url.startswith("s3://"):
            raise ConfigError(
                f"storage {storage_url!r}: pods and the API share results on s3://bucket/prefix"
            )
        urls["storage"] = storage_url
    values: dict[str, Any] = {
        "engine": engine,
        "urls": urls,
        "agent": {"drainSeconds": drain_s},
        "fleet": _fleet_for_pods(fleet),
        "queues": queues,
    }
    if engine == "aws":
        values["aws"] = {"region": region}
    else:
        values["ensureJob"] = {"enabled": True}
        values["redis"] = _redis_values(redis_address, redis_password_secret)
    return values


# -- settings chosen by `sdfleet simulate` -------------------------------------------------------

SIMULATED_SCALING = {
    "minReplicaCount", "maxReplicaCount", "targetBacklog", "activationBacklog", "scaleOnInFlight",
    "pollingInterval", "cooldownPeriod", "behavior",
}  # fmt: skip
SIMULATED_GPU_CLASS = {"consolidateAfter", "onDemandFallback"}


def apply_simulated(values: dict[str, Any], path: Path) -> dict[str, Any]:
    """``values`` with the settings ``sdfleet simulate`` wrote (``settings.yaml``, or the sweep's
    ``chosen.yaml``: ``{queues: {name: scaling}, karpenter: {gpuClasses: {class: ...}}}``) merged
    in: each queue's ``scaling`` and each GPU class's consolidation and on-demand fallback.
    Raises ``ConfigError`` on an unreadable file, a queue the fleet lacks or an unknown key."""
    try:
        chosen = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise cannot_read("simulated settings", path, e) from e
    if not isinstance(chosen, dict) or not set(chosen) <= {"queues", "karpenter"}:
        raise ConfigError(f"{path}: expected {{queues: ..., karpenter: ...}} as `sdfleet simulate` writes")
    by_name = {q["name"]: q for q in values["queues"]}
    for name, scaling in (chosen.get("queues") or {}).items():
        if name not in by_name:
            raise ConfigError(f"{path}: queue {name!r} is not in the fleet ({', '.join(by_name)})")
        unknown = set(scaling) - SIMULATED_SCALING if isinstance(scaling, dict) else {"(not a mapping)"}
        if unknown:
            raise ConfigError(f"{path}: queue {name!r}: unknown scaling keys {sorted(unknown)}")
        by_name[name]["scaling"] = {**by_name[name]["scaling"], **scaling}
    classes = ((chosen.get("karpenter") or {}).get("gpuClasses")) or {}
    for gpu_class, settings in classes.items():
        unknown = set(settings) - SIMULATED_GPU_CLASS
        if unknown:
            raise ConfigError(f"{path}: GPU class {gpu_class!r}: unknown keys {sorted(unknown)}")
        target = values.setdefault("karpenter", {}).setdefault("gpuClasses", {}).setdefault(gpu_class, {})
        target.update(settings)
    return values


def _redis_values(address: str | None, password_secret: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"address": address} if address else {}
    if password_secret:
        name, _, key = password_secret.partition(":")
        out["passwordSecret"] = {"name": name, "key": key or "password"}
    return out
