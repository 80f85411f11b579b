"""Runtimes with one behaviour each, loaded by import path (``runtime: fakes.runtimes:AlwaysFails``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdfleet.errors import RuntimeFailure
from sdfleet.models.catalog import ModelCatalog
from sdfleet.runtimes.base import Job, ProgressFn, RuntimeResult


class AlwaysFails:
    """Every run fails like a crashed WebUI would: the agent must retry, then dead-letter."""

    name = "always-fails"
    max_in_flight = 1

    def __init__(self, message: str = "the GPU caught fire") -> None:
        self.message = message
        self.runs = 0

    @classmethod
    def from_options(
        cls, *, catalog: ModelCatalog, options: Mapping[str, Any], default_model: str | None, cache_size: int
    ) -> AlwaysFails:
        return cls(str(options.get("message", "the GPU caught fire")))

    async def start(self) -> None:
        return None

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        self.runs += 1
        await progress(0.5)
        raise RuntimeFailure(self.message)

    async def interrupt(self, task_id: str | None = None) -> None:
        return None

    @property
    def loaded_model(self) -> str | None:
        return None

    async def aclose(self) -> None:
        return None
