"""The API caps each task's ``timeout_s`` at its queue's ``task_timeout_s``: the drain the chart
gives the queue's workers on scale-in (issue 14, defect 5) then covers every task they run."""

from __future__ import annotations

from pathlib import Path

import httpx

from sdfleet.api.app import create_app
from sdfleet.build import Engines, api_context
from sdfleet.settings import FleetConfig, Settings


async def test_task_timeouts_are_capped_at_the_queues(tmp_path: Path) -> None:
    fleet = FleetConfig.model_validate({"queues": [{"name": "q", "task_timeout_s": 120}]})
    settings = Settings(data_dir=tmp_path, fleet=fleet)
    engines = Engines(settings)
    await engines.ensure()
    try:
        ctx = api_context(settings, engines)
        transport = httpx.ASGITransport(create_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as api:
            for asked, kept in ((None, 120), (3000, 120), (30, 30)):
                body = {"params": {"prompt": "p"}, **({"timeout_s": asked} if asked else {})}
                r = await api.post("/v1/tasks", json=body)
                assert r.status_code == 202, r.text
                record = await engines.store.get("default", r.json()["id"])
                assert record is not None and record.task.timeout_s == kept, (asked, record.task.timeout_s)
    finally:
        await engines.aclose()
