"""What the API's routes work with, built once by ``create_app`` and reached through ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from sdfleet.bus.base import Bus
from sdfleet.models.catalog import ModelCatalog
from sdfleet.settings import ApiSettings, FleetConfig, WebhookSettings
from sdfleet.storage.base import BlobStore
from sdfleet.store.base import TaskStore
from sdfleet.telemetry import Metrics


@dataclass
class ApiContext:
    bus: Bus
    store: TaskStore
    storage: BlobStore
    fleet: FleetConfig
    settings: ApiSettings
    catalog: ModelCatalog | None
    metrics: Metrics
    ready: bool = False
    webhook: WebhookSettings = field(default_factory=WebhookSettings)

    @property
    def signing_key(self) -> str:
        """The file-link key (``api_context`` fills in a random one when none is configured)."""
        if self.settings.signing_key is None:
            raise RuntimeError("ApiContext built without a signing key")
        return self.settings.signing_key


def get_ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx
