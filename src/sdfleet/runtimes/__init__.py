"""Runtimes by name, imported lazily so torch is loaded only by the process that runs diffusers."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from sdfleet.errors import ConfigError
from sdfleet.models.catalog import ModelCatalog
from sdfleet.runtimes.base import Job, ProgressFn, Runtime, RuntimeResult

# name → (module, class, extra that provides its third-party imports). Each class has a
# ``from_options(*, catalog, options, default_model, cache_size)`` classmethod.
RUNTIMES: dict[str, tuple[str, str, str | None]] = {
    "diffusers": ("sdfleet.runtimes.diffusers", "DiffusersRuntime", "diffusers"),
    "synthetic": ("sdfleet.runtimes.synthetic", "SyntheticRuntime", None),
    "a1111": ("sdfleet.runtimes.a1111", "A1111Runtime", None),
    "comfyui": ("sdfleet.runtimes.comfyui", "ComfyUIRuntime", None),
}


def build_runtime(
    name: str,
    *,
    catalog: ModelCatalog,
    options: Mapping[str, Any],
    default_model: str | None = None,
    cache_size: int = 2,
) -> Runtime:
    """Construct runtime ``name`` from its config ``options``; raises ``ConfigError``.

    ``name`` is a built-in runtime or ``package.module:Class`` for one of your own (a class with the
    same ``from_options`` classmethod).
    """
    if name in RUNTIMES:
        module_name, cls_name, extra = RUNTIMES[name]
    elif ":" in name:
        module_name, cls_name = name.split(":", 1)
        extra = None
    else:
        raise ConfigError(
            f"unknown runtime {name!r}; use one of {', '.join(sorted(RUNTIMES))} or 'package.module:Class'"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if extra is None and e.name is not None and module_name.startswith(e.name):
            # 'package.module:Class' naming a module that is not there (not one it imports)
            raise ConfigError(f"runtime {name!r}: no module named {e.name!r} on this Python's path") from e
        if extra is None or (e.name or "").startswith("sdfleet"):
            raise
        raise ConfigError(f"the {name} runtime needs {e.name}: pip install 'sdfleet[{extra}]'") from e
    cls = getattr(module, cls_name, None)
    if cls is None or not hasattr(cls, "from_options"):
        raise ConfigError(f"{module_name} has no runtime class {cls_name!r} with a from_options() method")
    factory = cls.from_options
    try:
        runtime: Runtime = factory(
            catalog=catalog, options=options, default_model=default_model, cache_size=cache_size
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad options for the {name} runtime: {e}") from e
    return runtime


__all__ = ["RUNTIMES", "Job", "ProgressFn", "Runtime", "RuntimeResult", "build_runtime"]
