"""The OpenAPI document is complete, and the API holds to it under schemathesis (issue 12, defect 9):
every check (``--checks all``: no 5xx, responses and status codes as documented, schema-valid
requests accepted and invalid ones refused, auth enforced), a bounded run with a fixed seed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from conftest import Engine, RunningFleet, StartFleet, fleet_settings
from sdfleet.settings import QueueConfig, TenantConfig

pytestmark = [pytest.mark.timeout(600), pytest.mark.parametrize("engine", ["sqlite"], indirect=True)]

KEY = "fuzzing-tenant-key"
QUEUE = [QueueConfig(name="q", runtime="synthetic")]
EXAMPLES = 20
SEED = 7


async def _fleet(start_fleet: StartFleet, engine: Engine, tmp_path: Path) -> RunningFleet:
    (tmp_path / "models").mkdir()
    settings = fleet_settings(engine, tmp_path / "models", QUEUE, runtimes={"synthetic": {"latency_s": 0}})
    settings.fleet.models.default = None  # no catalog: any model name is accepted
    settings.fleet.tenants = {hashlib.sha256(KEY.encode()).hexdigest(): TenantConfig(name="fuzz")}
    settings.webhook.allow_private = True  # URL syntax only: random host names resolve nowhere here
    settings.webhook.max_retry_s = 1
    return await start_fleet(QUEUE, settings=settings)


async def test_document_has_bodies_security_and_error_answers(
    start_fleet: StartFleet, engine: Engine, tmp_path: Path
) -> None:
    fleet = await _fleet(start_fleet, engine, tmp_path)
    doc: dict[str, Any] = (await fleet.http.get("/openapi.json")).json()
    paths = doc["paths"]
    for path in ("/v1/tasks", "/v1alpha1/", "/v1alpha2/"):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].startswith("#/components/schemas/"), path
        assert {"400", "401", "413", "422", "429", "503"} <= set(paths[path]["post"]["responses"]), path
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert doc["security"] == [{"bearer": []}, {"apiKey": []}]
    assert paths["/healthz"]["get"]["security"] == []
    assert "409" in paths["/v1/tasks/{task_id}/cancel"]["post"]["responses"]
    assert "404" in paths["/v1/tasks/{task_id}"]["get"]["responses"]
    assert "Retry-After" in paths["/v1/tasks"]["post"]["responses"]["429"]["headers"]
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == [CONTENT_TYPE_LATEST]
    params = doc["components"]["schemas"]["TaskRequest"]["properties"]["params"]["properties"]
    assert params["width"]["multipleOf"] == 8 and params["width"]["maximum"] == 2048


def _schemathesis() -> str:
    exe = shutil.which(
        "schemathesis", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    if exe is None:
        raise RuntimeError("schemathesis is not installed: pip install 'sdfleet[dev]'")
    return exe


# `make test` runs every check on every operation with a few examples each (schemathesis's coverage
# phase is the same in both); `make test-slow` with EXAMPLES (90 s of CPU here against 70 s).
@pytest.mark.parametrize(
    "examples", [pytest.param(5, id="quick"), pytest.param(EXAMPLES, id="full", marks=pytest.mark.slow)]
)
async def test_schemathesis_finds_nothing_with_every_check(
    start_fleet: StartFleet, engine: Engine, tmp_path: Path, examples: int
) -> None:
    fleet = await _fleet(start_fleet, engine, tmp_path)
    here = Path(__file__).resolve().parent
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here), *sys.path]))
    args = [
        f"{fleet.api_url}/openapi.json",
        "--checks=all",
        f"--header=Authorization: Bearer {KEY}",
        f"--max-examples={examples}",
        f"--seed={SEED}",
        "--workers=1",
        "--request-timeout=30",
        "--warnings=off",
        "--no-color",
    ]
    proc = await asyncio.create_subprocess_exec(
        _schemathesis(),
        "run",
        *args,
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report[-20_000:]
    assert " passed" in report and "failure" not in report.lower(), report[-5_000:]
