"""sdfleet: asynchronous Stable Diffusion image generation at scale."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdfleet.client import AsyncClient
    from sdfleet.errors import SdfleetError
    from sdfleet.settings import FleetConfig, Settings, load_settings
    from sdfleet.tasks import Task, TaskEvent, TaskParams, TaskRecord, TaskResult, TaskState, TaskType

__version__ = "0.1.0"

# Loaded on first use (PEP 562): every ``sdfleet.*`` import runs this file first, and a command
# that needs neither the HTTP client nor the task models should not pay for importing them.
_HOME = {
    "AsyncClient": "sdfleet.client",
    "FleetConfig": "sdfleet.settings",
    "SdfleetError": "sdfleet.errors",
    "Settings": "sdfleet.settings",
    "Task": "sdfleet.tasks",
    "TaskEvent": "sdfleet.tasks",
    "TaskParams": "sdfleet.tasks",
    "TaskRecord": "sdfleet.tasks",
    "TaskResult": "sdfleet.tasks",
    "TaskState": "sdfleet.tasks",
    "TaskType": "sdfleet.tasks",
    "load_settings": "sdfleet.settings",
}

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


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'sdfleet' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
