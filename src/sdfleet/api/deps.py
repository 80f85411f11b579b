"""What the API's routes work with, built once by ``create_app`` and reached through ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from sdfleet.bus.base import Bus
from sdfleet.models.catalog import ModelCatalog
from sdfleet.settings import ApiSettings, FleetConfig, WebhookSettings
from sdfleet.storage.base import BlobStore
from sdfleet.store.access import AccessStore
from sdfleet.store.base import TaskStore
from sdfleet.telemetry import Metrics

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
    ready: bool = False
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    keys: KeyRing = field(init=False)

    def __post_init__(self) -> None:
        from sdfleet.api.auth import KeyRing

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


def get_ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx
