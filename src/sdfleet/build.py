"""Wiring: settings → the parts of an API process or an agent. The only place backends are chosen."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import uuid
from contextlib import AsyncExitStack
from typing import Any

from sdfleet.agent.parts import Parts
from sdfleet.api.deps import ApiContext
from sdfleet.bus import Bus, open_bus
from sdfleet.bus.restore import TopologyKeeper
from sdfleet.compat.notify import seed_notification
from sdfleet.errors import ConfigError, NotFound
from sdfleet.guarded_http import InputFetcher
from sdfleet.models.catalog import HOW_TO_ADD, ModelCatalog, default_model, folder_named, unreadable
from sdfleet.notify.base import Notifier
from sdfleet.notify.topic import TopicNotifier
from sdfleet.notify.webhook import WebhookNotifier
from sdfleet.routing import fleet_topology
from sdfleet.runtimes import build_runtime
from sdfleet.runtimes.base import Runtime
from sdfleet.settings import Settings
from sdfleet.storage import BlobStore, open_storage
from sdfleet.store import TaskStore, open_store
from sdfleet.store.access import AccessStore, open_access
from sdfleet.telemetry import Metrics

log = logging.getLogger(__name__)


class Engines:
    """Bus, store (with the API's access state beside it) and storage opened from the settings'
    URLs, closed together. Nothing connects before its first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bus: Bus = open_bus(settings.bus)
        self.store: TaskStore = open_store(settings.store, retain_s=settings.fleet.retain_s)
        self.access: AccessStore = open_access(settings.store)
        self.storage: BlobStore = open_storage(settings.storage)
        self.keeper = TopologyKeeper(
            self.bus, fleet_topology(settings.fleet), allowed=settings.ensure_topology
        )

    async def ensure(self) -> None:
        await self.bus.ensure(self.keeper.topology)

    async def aclose(self) -> None:
        await self.bus.aclose()
        await self.store.aclose()
        await self.access.aclose()
        await self.storage.aclose()


async def open_engines(settings: Settings, stack: AsyncExitStack) -> Engines:
    engines = Engines(settings)
    stack.push_async_callback(engines.aclose)
    if settings.ensure_topology:
        await engines.ensure()
    return engines


def catalog(settings: Settings, *, fetch: bool = False) -> ModelCatalog:
    """The models folder; with ``fetch`` (an agent's runtime) and ``models.s3`` set, models that
    are not on disk are fetched from S3 on demand."""
    m = settings.fleet.models
    if not fetch or m.s3 is None:
        return ModelCatalog(m.dir)
    if m.dir.is_dir() and not os.access(m.dir, os.W_OK):
        # A read-only models volume (the chart's default, an S3 Mountpoint): nothing can be
        # downloaded into it, and the fetcher's per-model locks there would fail every lookup.
        log.warning(
            "models.s3 is set but %s is read-only: models are not fetched on demand, "
            "so every model a task names must already be in the folder",
            m.dir,
        )
        return ModelCatalog(m.dir)
    try:
        from sdfleet.models.fetcher import ModelFetcher
    except ModuleNotFoundError as e:
        raise ConfigError(f"models.s3 needs {e.name}: pip install 'sdfleet[aws]'") from e

    budget = int(m.disk_budget_gb * 2**30) if m.disk_budget_gb is not None else None
    fetcher = ModelFetcher(
        m.dir,
        m.s3,
        disk_budget=budget,
        part_size=m.part_size_mb * 2**20,
        jobs=m.transfer_jobs,
        keep=m.cache_size,
    )
    return ModelCatalog(m.dir, fetcher)


def api_context(settings: Settings, engines: Engines, metrics: Metrics | None = None) -> ApiContext:
    api = settings.api
    if api.signing_key is None:
        # Never a well-known default: anyone could sign links to any stored file.
        if api.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("SDFLEET_API__SIGNING_KEY is unset: file links work only on this API replica")
        api = api.model_copy(update={"signing_key": secrets.token_hex(32)})
    metrics = metrics or Metrics()
    metrics.start_api(q.name for q in settings.fleet.queues)
    return ApiContext(
        bus=engines.bus,
        store=engines.store,
        storage=engines.storage,
        fleet=settings.fleet,
        settings=api,
        catalog=catalog(settings),
        metrics=metrics or Metrics(),
        access=engines.access,
        webhook=settings.webhook,
        keeper=engines.keeper,
    )


def runtime_options(settings: Settings, name: str) -> dict[str, Any]:
    """``runtimes.<name>`` of the fleet file; the diffusers runtime's generation bound defaults to
    the API's (``api.max_width`` × ``api.max_height``): the one fleet file sets both."""
    options = dict(settings.fleet.runtimes.get(name, {}))
    if name == "diffusers":
        options.setdefault("generate_max_pixels", settings.api.max_width * settings.api.max_height)
    return options


def _warn_unreadable_default(queue: str, models: ModelCatalog, name: str | None) -> None:
    """The model a queue's tasks run on when they name none, glanced at once: a corrupt one would
    otherwise show only as each such task failing ``model_load_error`` three times."""
    if not name:
        return
    try:
        info = models.resolve(name)
    except NotFound:
        return  # not here yet: fetched from models.s3 by the first task, or that task fails
    reason = unreadable(info)
    if reason is not None:
        log.warning(
            "queue %s: its default model %s cannot be read (%s); tasks that name no model will fail "
            "until it is replaced",
            queue,
            info.path,
            reason,
        )


def make_runtime(settings: Settings, queue: str, runtime: str | None = None) -> Runtime:
    q = settings.fleet.queue(queue)
    if q is None:
        raise ConfigError(f"unknown queue {queue!r}; the fleet has {[q.name for q in settings.fleet.queues]}")
    name = runtime or q.runtime
    models = catalog(settings, fetch=True)
    if name == "diffusers" and settings.fleet.models.s3 is None and not models.list():
        # Every task of this queue would fail `no_model`; the agent still starts (models may be
        # copied in while it runs), but the operator hears of it now, not from the first failure.
        log.warning(
            "queue %s: the models folder %s holds no model; its tasks will fail until one is there (%s)",
            q.name,
            folder_named(settings.fleet.models.dir),
            HOW_TO_ADD,
        )
    elif name == "diffusers":
        _warn_unreadable_default(
            q.name, models, default_model(q.model or settings.fleet.models.default, models)
        )
    return build_runtime(
        name,
        catalog=models,
        options=runtime_options(settings, name),
        default_model=q.model or settings.fleet.models.default,
        cache_size=settings.fleet.models.cache_size,
    )


def agent_parts(
    settings: Settings, engines: Engines, queue: str, runtime: Runtime, metrics: Metrics | None = None
) -> Parts:
    q = settings.fleet.queue(queue)
    if q is None:
        raise ConfigError(f"unknown queue {queue!r}")
    a = settings.agent
    fetcher = InputFetcher(
        max_bytes=a.input_max_bytes,
        timeout_s=a.input_timeout_s,
        allow_private=a.allow_private_inputs,
        s3_buckets=a.input_s3_buckets,
        max_pixels=a.input_max_pixels,
    )
    notifiers: list[Notifier] = [
        TopicNotifier(
            engines.bus,
            settings.fleet.results_topic,
            seed_notification(engines.storage),
            locate=engines.storage.location,
            queue_format=q.notify_format,
            running=a.notify_running,
        ),
        webhook_notifier(settings),
    ]
    metrics = metrics or Metrics()
    metrics.start_agent(q.name, runtime.name)
    return Parts(
        bus=engines.bus,
        store=engines.store,
        storage=engines.storage,
        runtime=runtime,
        notifiers=notifiers,
        fetcher=fetcher,
        queue=q,
        fleet=settings.fleet,
        settings=a,
        worker_id=f"{socket.gethostname()}-{os.getpid()}-{queue}-{uuid.uuid4().hex[:6]}",
        metrics=metrics,
        keeper=engines.keeper,
    )


def webhook_notifier(settings: Settings) -> WebhookNotifier:
    """The agent's webhook sender; closing it drains deliveries in flight (``webhook.drain_s``)."""
    w = settings.webhook
    return WebhookNotifier(
        secret=w.secret.get_secret_value() if w.secret else "",
        allow_private=w.allow_private,
        timeout_s=w.timeout_s,
        max_retry_s=w.max_retry_s,
        backoff_s=w.retry_backoff_s,
        throttle_s=w.throttle_s,
        drain_s=w.drain_s,
    )
