"""An AUTOMATIC1111-compatible HTTP server in front of an sdfleet runtime (``sdfleet runtime serve``)."""

from __future__ import annotations

from sdfleet.runtime_server.app import create_app

__all__ = ["create_app"]
