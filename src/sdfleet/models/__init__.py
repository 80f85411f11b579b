"""Model catalog and the tiny-model builder (which imports torch only when called)."""

from __future__ import annotations

from sdfleet.models.catalog import ModelCatalog, ModelInfo
from sdfleet.models.tiny import make_tiny

__all__ = ["ModelCatalog", "ModelInfo", "make_tiny"]
