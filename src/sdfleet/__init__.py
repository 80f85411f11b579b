"""sdfleet: asynchronous Stable Diffusion image generation at scale."""

from __future__ import annotations

from sdfleet.client import AsyncClient
from sdfleet.errors import SdfleetError
from sdfleet.settings import FleetConfig, Settings, load_settings
from sdfleet.tasks import Task, TaskEvent, TaskParams, TaskRecord, TaskResult, TaskState, TaskType

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "FleetConfig",
    "SdfleetError",
    "Settings",
    "Task",
    "TaskEvent",
    "TaskParams",
    "TaskRecord",
    "TaskResult",
    "TaskState",
    "TaskType",
    "__version__",
    "load_settings",
]
