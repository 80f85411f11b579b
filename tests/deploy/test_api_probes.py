"""``/readyz`` (the API's readiness probe, every 5 s per replica) against a real Redis that blips:
engines read at most once per ``api.ready_check_s``, one failed check does not unready the
replica, a lasting outage does, recovery readies it again."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import redis
from local_services import LocalRedis

from sdfleet.api.app import create_app
from sdfleet.build import Engines, api_context
from sdfleet.settings import ApiSettings, Settings

PERIOD = 0.6


def _commands(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


async def test_readiness_survives_a_blip_but_not_an_outage(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    server = LocalRedis(tmp_path / "redis")  # its own: this test stops it (data kept across)
    probe = redis.Redis(port=server.port)
    url = f"{server.url}?prefix=ready{uuid.uuid4().hex[:6]}"
    settings = Settings(bus_url=url, store_url=url, data_dir=tmp_path, api=ApiSettings(ready_check_s=PERIOD))
    engines = Engines(settings)
    try:
        await engines.ensure()
        app = create_app(api_context(settings, engines))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api") as api:
            assert (await api.get("/readyz")).status_code == 200
            before = _commands(probe)
            for _ in range(10):  # probes within one period: no engine round trip
                assert (await api.get("/readyz")).status_code == 200
            assert _commands(probe) - before == 1  # the first INFO call itself
            probe.close()

            server.stop()
            await asyncio.sleep(PERIOD)
            blip = await api.get("/readyz")
            assert blip.status_code == 200 and "warning" in blip.json()
            await asyncio.sleep(2 * PERIOD)
            assert (await api.get("/readyz")).status_code == 503

            server.start()
            codes = []
            for _ in range(20):  # the pool reconnects on the first failed command
                codes.append((await api.get("/readyz")).status_code)
                if codes[-1] == 200:
                    break
                await asyncio.sleep(0.1)
            assert codes[-1] == 200, codes
    finally:
        await engines.aclose()
        server.stop()
