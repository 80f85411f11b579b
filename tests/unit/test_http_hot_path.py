"""An async HTTP request imports nothing once the client is warm.

Every runtime call, progress poll, input fetch and webhook goes through httpx. httpcore asks for
``sniffio`` on every lock, event and cancellation shield of a request and falls back to asyncio
when the import fails; a failed import is never cached, so without ``sniffio`` installed (anyio
4.11+ no longer brings it) each request scanned ``sys.path`` four times, close to 30 % of its CPU.
``sniffio`` is a dependency for that reason; this test keeps any such per-request import out.
"""

from __future__ import annotations

import asyncio
import importlib.abc
import io
import sys
from collections.abc import Sequence
from types import ModuleType

import httpx
from PIL import Image

from sdfleet.guarded_http import InputFetcher

JSON = b'{"ok": true}'


class Lookups(importlib.abc.MetaPathFinder):
    """Records every module name the import system searches for (found or not); finds nothing."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> None:
        self.names.append(fullname)


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG")
    return out.getvalue()


PNG = _png()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 with keep-alive, as SD WebUI's uvicorn answers: JSON, or a PNG for ``*.png``."""
    try:
        while True:
            head = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
            sizes = [int(h.split(b":")[1]) for h in head if h.lower().startswith(b"content-length:")]
            await reader.readexactly(sum(sizes))
            png = head[0].split()[1].endswith(b".png")
            body, kind = (PNG, b"image/png") if png else (JSON, b"application/json")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\n" % kind)
            writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def test_a_warm_client_makes_requests_without_import_lookups() -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    lookups = Lookups()
    try:
        # As the a1111 and comfyui runtimes hold theirs, and the agent its input fetcher.
        async with (
            httpx.AsyncClient(base_url=url) as client,
            InputFetcher(max_bytes=1 << 20, timeout_s=10, allow_private=True) as fetcher,
        ):
            await client.get("/warm")
            await fetcher.fetch(f"{url}/warm.png")
            sys.meta_path.insert(0, lookups)
            try:
                for _ in range(3):
                    assert (await client.get("/sdapi/v1/progress")).json() == {"ok": True}
                    answer = await client.post("/sdapi/v1/txt2img", json={"prompt": "x"})
                    assert answer.json() == {"ok": True}
                    assert await fetcher.fetch(f"{url}/input.png") == PNG
            finally:
                sys.meta_path.remove(lookups)
    finally:
        server.close()
        await server.wait_closed()
    assert lookups.names == []
