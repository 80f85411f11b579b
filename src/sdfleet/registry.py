"""Scheme → backend registry with lazy imports, so optional extras are imported only when used."""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from sdfleet.errors import ConfigError


def load_backend(
    kind: str, backends: dict[str, tuple[str, str, str | None]], url: str, **options: Any
) -> Any:
    """Import the backend class for ``url``'s scheme and call its ``from_url(url, **options)``."""
    scheme = urlsplit(url).scheme
    if scheme not in backends:
        known = ", ".join(f"{s}://" for s in sorted(backends))
        raise ConfigError(f"unknown {kind} URL scheme {scheme!r} in {url!r}; use one of {known}")
    module_name, cls_name, extra = backends[scheme]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if extra is None or (e.name or "").startswith("sdfleet"):
            raise
        raise ConfigError(
            f"the {scheme}:// {kind} needs the '{extra}' extra: pip install 'sdfleet[{extra}]'"
        ) from e
    return getattr(module, cls_name).from_url(url, **options)
