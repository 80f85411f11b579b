"""A small closed-loop HTTP load generator, run in its own process so that it never shares an event
loop (or a GIL) with the server it measures.

``python bench/_load.py URL REQUESTS CLIENTS REQUEST.json OUT.json``: CLIENTS keep-alive
connections send the request in REQUEST.json (``{"method", "path", "headers", "body"}``) REQUESTS
times in all, each as soon as the previous answer came; OUT.json gets every latency (seconds),
the status counts and the wall time. Raw HTTP/1.1 on asyncio streams: a client library would cost
the generator more CPU than the server spends on a request.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


def build_request(host: str, spec: dict[str, Any]) -> bytes:
    body = json.dumps(spec.get("body")).encode() if spec.get("body") is not None else b""
    lines = [f"{spec['method']} {spec['path']} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in spec.get("headers", {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _answer(reader: asyncio.StreamReader) -> int:
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _client(host: str, port: int, request: bytes, left: list[int], out: dict[str, Any]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while left[0] > 0:
            left[0] -= 1
            t0 = time.perf_counter()
            writer.write(request)
            status = await _answer(reader)
            out["latency_s"].append(time.perf_counter() - t0)
            out["status"][str(status)] = out["status"].get(str(status), 0) + 1
    finally:
        writer.close()


async def run(url: str, requests: int, clients: int, spec: dict[str, Any]) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = build_request(f"{host}:{port}", spec)
    out: dict[str, Any] = {"latency_s": [], "status": {}}
    left = [requests]
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(host, port, request, left, out) for _ in range(clients)))
    out["wall_s"] = time.perf_counter() - t0
    return out


def main(argv: list[str]) -> int:
    url, requests, clients, spec_file, out_file = argv
    spec = json.loads(Path(spec_file).read_text())
    try:
        import uvloop

        result = uvloop.run(run(url, int(requests), int(clients), spec))
    except ImportError:
        result = asyncio.run(run(url, int(requests), int(clients), spec))
    Path(out_file).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
