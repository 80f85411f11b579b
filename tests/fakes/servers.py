"""uvicorn in a thread on 127.0.0.1 (httpx's ``serve_in_thread`` pattern), for apps the tests talk to."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from sdfleet.models import ModelCatalog, make_tiny


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """Serves ``app`` on a free port until ``stop()``; ``url`` is its base URL."""

    def __init__(self, app: Any, port: int, *, tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: serve HTTPS with this (certificate, key) pair of PEM files."""
        certfile, keyfile = (str(tls[0]), str(tls[1])) if tls else (None, None)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            ws="websockets-sansio",
            lifespan="on",
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
        )
        self.server = uvicorn.Server(config)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def tiny_catalog(root: Path) -> ModelCatalog:
    """Two tiny SD models (a folder and a single-file checkpoint) for the A1111 tests."""
    make_tiny(root, "tiny-a", seed=0)
    make_tiny(root, "tiny-b", seed=1, single_file=True)
    return ModelCatalog(root)


def a1111_server(
    root: Path, port: int, default_model: str | None = "tiny-a", *, sdwebui_status: bool = False
) -> ServerThread:
    """``sdfleet runtime serve``'s app on the diffusers runtime (CPU) and two tiny models; with
    ``sdwebui_status`` it answers client mistakes with SD WebUI's own status codes (500s)."""
    from sdfleet.runtime_server import create_app
    from sdfleet.runtimes.diffusers import DiffusersRuntime

    catalog = tiny_catalog(root)
    runtime = DiffusersRuntime(catalog, default_model=default_model, device="cpu")
    return ServerThread(create_app(runtime, catalog, sdwebui_status=sdwebui_status), port).start()
