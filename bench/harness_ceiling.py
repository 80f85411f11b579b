"""The most any agent can get from an SD WebUI server: a bare client keeping it fed, no queue at all.

``compare.sh`` (the seed's harness, ``../shared/bench/seed-agent``) scores an agent by ``busy`` =
N × latency / wall on a fake SD WebUI that sleeps a fixed latency per image under one lock. Part
of what separates ``busy`` from 1 is the server's own: after each image it builds and sends the
~0.7 MB JSON answer on the same event loop before the next waiting request can take the lock. This
scenario measures that ceiling with the cheapest possible client: ``--queued`` + 1 requests in
flight at all times (as the a1111 runtime keeps them), each answer JSON- and base64-decoded (as any
agent must), no bus, no store, no storage. ``busy`` = N × latency / (last answer − first request);
where the server has ``/_bench/stats`` (the harness's fake), its own count too: ``gap`` is the time
per image between one image's end and the next one's start on the server.

    python bench/harness_ceiling.py --fake ../shared/bench/seed-agent/fake_sdwebui.py
    python bench/harness_ceiling.py --url http://127.0.0.1:7860 --latency-ms 0 --tasks 20
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from sdfleet.cli_common import print_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fleet import free_port, stop_process, wait_port

RESULTS = Path(__file__).parent / "results"
DEFAULT_FAKE = Path(__file__).resolve().parents[2] / "shared" / "bench" / "seed-agent" / "fake_sdwebui.py"


class Fake:
    """The harness's fake SD WebUI in a child process, stopped by its PID."""

    def __init__(self, script: Path, latency_ms: float, python: str) -> None:
        self.port = free_port()
        env = {**os.environ, "LATENCY_MS": str(latency_ms)}
        cmd = [python, str(script), "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"


async def _stats(client: httpx.AsyncClient, url: str, reset: bool = False) -> dict[str, Any] | None:
    try:
        if reset:
            r = await client.post(f"{url}/_bench/reset", json={})
        else:
            r = await client.get(f"{url}/_bench/stats")
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


async def drive(url: str, n: int, queued: int, size: int, latency_s: float) -> dict[str, Any]:
    """``n`` txt2img requests with ``queued + 1`` in flight; the answers decoded as an agent would."""
    body = {"prompt": "A dog", "steps": 16, "width": size, "height": size}
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(2):  # warm-up: connections, the fake's PNG cache
            (await client.post(f"{url}/sdapi/v1/txt2img", json=body)).raise_for_status()
        await _stats(client, url, reset=True)
        left = n
        ends: list[float] = []

        async def one_lane() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                r = await client.post(f"{url}/sdapi/v1/txt2img", json=body)
                r.raise_for_status()
                for image in json.loads(r.content)["images"]:
                    base64.b64decode(image)
                ends.append(time.time())

        t0 = time.time()
        await asyncio.gather(*(one_lane() for _ in range(queued + 1)))
        wall = max(ends) - t0
        st = await _stats(client, url)
    out: dict[str, Any] = {"tasks": n, "wall_s": round(wall, 4), "tasks_per_s": round(n / wall, 3)}
    if latency_s > 0:
        out["busy"] = round(n * latency_s / wall, 4)
        out["overhead_ms"] = round((wall / n - latency_s) * 1000, 2)
    if st and st.get("first_start") and st.get("last_end"):
        span = st["last_end"] - st["first_start"]
        out["server_busy"] = round(st["busy_s"] / span, 4)
        out["gap_ms"] = round((span - st["busy_s"]) / max(1, n - 1) * 1000, 2)
        out["sleep_overshoot_ms"] = round((st["busy_s"] / max(1, st["images"]) - latency_s) * 1000, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--fake", type=Path, default=None, help=f"the harness's fake (default {DEFAULT_FAKE})")
    where.add_argument("--url", default=None, help="an SD WebUI API already running (left running)")
    ap.add_argument("--python", default=sys.executable, help="runs --fake (needs fastapi, uvicorn, pillow)")
    ap.add_argument("--latencies-ms", type=float, nargs="+", default=[200.0, 50.0])
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--queued", type=int, default=1, help="requests waiting besides the running one")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.url is None:
        a.fake = a.fake or DEFAULT_FAKE
        if not a.fake.is_file():
            ap.error(f"no fake SD WebUI at {a.fake} (give --fake PATH or --url URL)")

    runs: dict[float, list[dict[str, Any]]] = {lat: [] for lat in a.latencies_ms}
    with Progress(transient=True) as bar:
        job = bar.add_task("runs", total=a.repeat * len(a.latencies_ms))
        for _ in range(a.repeat):
            for lat in a.latencies_ms:
                fake = None if a.url else Fake(a.fake, lat, a.python)
                try:
                    if fake:
                        wait_port(fake.port, timeout_s=60)
                    url = a.url or (fake.url if fake else "")
                    runs[lat].append(asyncio.run(drive(url, a.tasks, a.queued, a.size, lat / 1000)))
                finally:
                    if fake:
                        stop_process(fake.proc, timeout_s=5)
                bar.advance(job)

    def median(rows: list[dict[str, Any]], key: str) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return round(statistics.median(vals), 4) if vals else None

    keys = ("busy", "overhead_ms", "tasks_per_s", "server_busy", "gap_ms", "sleep_overshoot_ms")
    summary = [{"latency_ms": lat, **{k: median(rows, k) for k in keys}} for lat, rows in runs.items()]
    table = Table(title=f"bare client, {a.queued + 1} in flight, {a.tasks} × {a.size}², median of {a.repeat}")
    for col in ("latency", "busy", "overhead/task", "tasks/s", "server busy", "gap/task", "sleep overshoot"):
        table.add_column(col, justify="right")
    for s in summary:
        cells = [s[k] for k in keys]
        table.add_row(f"{s['latency_ms']:g} ms", *("–" if c is None else f"{c:g}" for c in cells))
    print_table(table, Console())

    doc = {
        "scenario": "harness_ceiling",
        "server": a.url or str(a.fake),
        "tasks": a.tasks,
        "queued": a.queued,
        "size": a.size,
        "repeat": a.repeat,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load": os.getloadavg()},
        "summary": summary,
        "runs": {str(k): v for k, v in runs.items()},
    }
    out = a.out or RESULTS / f"harness_ceiling-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
