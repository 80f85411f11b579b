"""What the API's routes work with, built once by ``create_app`` and reached through ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request
from opentelemetry.trace import Tracer

from sdfleet.bus.base import Bus, Topology
from sdfleet.bus.restore import TopologyKeeper
from sdfleet.models.catalog import ModelCatalog
from sdfleet.routing import fleet_topology
from sdfleet.settings import ApiSettings, FleetConfig, WebhookSettings
from sdfleet.storage.base import BlobStore
from sdfleet.store.access import AccessStore
from sdfleet.store.base import TaskStore
from sdfleet.telemetry import Metrics, tracer

if TYPE_CHECKING:
    from sdfleet.api.auth import KeyRing


@dataclass
class ApiContext:
    bus: Bus
    store: TaskStore
    storage: BlobStore
    fleet: FleetConfig
    settings: ApiSettings
    catalog: ModelCatalog | None
    metrics: Metrics
    access: AccessStore
    keeper: TopologyKeeper
    """Puts the topology back when the engine lost it (where ``ensure_topology`` allows)."""
    ready: bool = False
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    keys: KeyRing = field(init=False)
    topology: Topology = field(init=False)
    """``fleet_topology(fleet)``, computed once: submits route against it."""
    tracer: Tracer = field(init=False)

    def __post_init__(self) -> None:
        from sdfleet.api.auth import KeyRing

        self.topology = fleet_topology(self.fleet)
        self.tracer = tracer()  # a proxy until tracing is set up: it follows the global provider
        self.keys = KeyRing(
            self.fleet,
            self.access,
            cache_s=self.settings.key_cache_s,
            require_key=self.settings.require_key,
        )

    @property
    def signing_key(self) -> str:
        """The file-link key (``api_context`` fills in a random one when none is configured)."""
        if self.settings.signing_key is None:
            raise RuntimeError("ApiContext built without a signing key")
        return self.settings.signing_key


async def get_ctx(request: Request) -> ApiContext:
    # async: FastAPI runs a plain-def dependency in a thread pool, one thread hop per request
    ctx: ApiContext = request.app.state.ctx
    return ctx
