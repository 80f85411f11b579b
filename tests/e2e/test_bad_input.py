"""Every request a client can get wrong gets its 4xx and ``{"error": {"code", "message"}}`` with a
reason a human can act on — on ``/v1/tasks`` and on the seed's endpoints, never a 500."""

from __future__ import annotations

import asyncio
import copy
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import SD15, Engine, StartFleet, dedicated_and_dynamic, fleet_settings
from sdfleet.settings import TenantConfig
from sdfleet.tasks import TaskState

pytestmark = pytest.mark.timeout(120)

V1: dict[str, Any] = {"params": {"prompt": "a dog", "steps": 2, "width": 64, "height": 64}}
ALPHA1: dict[str, Any] = {
    "alwayson_scripts": {"task": "text-to-image", "sd_model_checkpoint": SD15, "id_task": "bad-1"},
    "prompt": "a dog",
    "steps": 2,
    "width": 64,
    "height": 64,
}
ALPHA2: dict[str, Any] = {
    "task": {
        "metadata": {"id": "bad-2", "runtime": "sdruntime", "tasktype": "text-to-image", "prefix": "out"},
        "content": {"alwayson_scripts": {}, "prompt": "a dog", "steps": 2, "width": 64, "height": 64},
    }
}
BODIES = {"/v1/tasks": V1, "/v1alpha1/": ALPHA1, "/v1alpha2/": ALPHA2}
# Where each endpoint keeps the generation parameters, the task type and the model.
PARAMS: dict[str, tuple[str, ...]] = {
    "/v1/tasks": ("params",),
    "/v1alpha1/": (),
    "/v1alpha2/": ("task", "content"),
}
TYPE: dict[str, tuple[str, ...]] = {
    "/v1/tasks": ("type",),
    "/v1alpha1/": ("alwayson_scripts", "task"),
    "/v1alpha2/": ("task", "metadata", "tasktype"),
}
MODEL: dict[str, tuple[str, ...]] = {
    "/v1/tasks": ("model",),
    "/v1alpha1/": ("alwayson_scripts", "sd_model_checkpoint"),
    "/v1alpha2/": ("task", "content", "alwayson_scripts", "sd_model_checkpoint"),
}
BIG = "x" * (1024 * 1024 + 1)
PNG = (  # 8x8
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGPk5ORkwAaYsIoOWgkAG+oAK1"
    "vdaFEAAAAASUVORK5CYII="
)


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
async def test_img2img_inputs_set_the_batch_one_item_each(start_fleet: StartFleet) -> None:
    """Two inputs and batch_size 4: SD WebUI makes 2 images, item i from input i, and so does this
    API (the record's batch_size says 2). Three inputs and batch_size 2, which SD WebUI refuses,
    make 3: the OpenAPI document cannot say "no more inputs than batch_size"."""
    fleet = await start_fleet()
    ids = []
    for inputs, batch in ((2, 4), (3, 2)):
        params = {**V1["params"], "init_images": [PNG] * inputs, "batch_size": batch}
        r = await fleet.http.post("/v1/tasks", json={"type": "image-to-image", "params": params})
        assert r.status_code == 202, r.text
        ids.append((r.json()["id"], inputs))
    for task_id, inputs in ids:
        view = await fleet.wait(task_id)
        assert view["state"] == "succeeded" and len(view["images"]) == inputs, view


def _set(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    holder = out
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    return out


def _param(endpoint: str, name: str, value: Any) -> dict[str, Any]:
    return _set(BODIES[endpoint], (*PARAMS[endpoint], name), value)


@dataclass
class Case:
    name: str
    status: int
    code: str | None
    """None: the seed endpoints' generic ``invalid_request`` is fine, the message must still say why."""
    says: tuple[str, ...]
    body: dict[str, Any] | None = None
    raw: bytes | None = None


def _cases(endpoint: str) -> list[Case]:
    bad_type = "text-to-video"
    cases = [
        Case("malformed JSON", 400, "malformed_json", ("malformed JSON",), raw=b'{"prompt": "a dog",'),
        Case("not an object", 422, "invalid_request", ("JSON object",), body=None, raw=b"[1, 2]"),
        Case("unknown task type", 422, None, (bad_type,), _set(BODIES[endpoint], TYPE[endpoint], bad_type)),
        Case("missing prompt", 422, None, ("prompt",), _param(endpoint, "prompt", "")),
        Case(
            "width not a multiple of 8", 422, None, ("width", "multiple of 8"), _param(endpoint, "width", 65)
        ),
        Case(
            "height not a multiple of 8",
            422,
            None,
            ("height", "multiple of 8"),
            _param(endpoint, "height", 100),
        ),
        Case(
            "over the maximum size", 422, "too_large", ("4096x64", "maximum"), _param(endpoint, "width", 4096)
        ),
        Case("zero steps", 422, None, ("steps",), _param(endpoint, "steps", 0)),
        Case("too many steps", 422, None, ("steps", "150"), _param(endpoint, "steps", 151)),
        Case("payload over 1 MB", 413, "payload_too_large", ("limit",), _param(endpoint, "prompt", BIG)),
        Case(
            "unknown model",
            422,
            "unknown_model",
            ("nope.safetensors",),
            _set(BODIES[endpoint], MODEL[endpoint], "nope.safetensors"),
        ),
    ]
    if endpoint == "/v1/tasks":
        cases += [
            Case("unknown queue", 422, "bad_queue", ("'nope'", "unknown queue"), {**V1, "queue": "nope"}),
            Case("unknown top-level field", 422, "invalid_request", ("colour",), {**V1, "colour": "red"}),
            Case(
                "img2img without an image",
                422,
                "missing_image",
                ("image-to-image tasks need an input image",),
                {**V1, "type": "image-to-image"},
            ),
            Case(
                "pipeline without a workflow",
                422,
                "missing_workflow",
                ("pipeline tasks need a workflow",),
                {**V1, "type": "pipeline"},
            ),
            Case(
                "unknown parameter",
                422,
                "invalid_request",
                ("params.guidance",),
                _param(endpoint, "guidance", 1),
            ),
        ]
    else:
        wrapper = "alwayson_scripts" if endpoint == "/v1alpha1/" else "task"
        cases.append(Case(f"no {wrapper}", 422, "invalid_request", (wrapper,), {"prompt": "a dog"}))
    return cases


async def test_each_bad_input_gets_its_4xx(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(agents=[])
    wrong: list[str] = []
    for endpoint in BODIES:
        for case in _cases(endpoint):
            headers = {"content-type": "application/json"}
            if case.raw is not None:
                r = await fleet.http.post(endpoint, content=case.raw, headers=headers)
            else:
                r = await fleet.http.post(endpoint, json=case.body)
            label = f"{endpoint} {case.name}: {r.status_code} {r.text[:300]}"
            try:
                error = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                wrong.append(f"{label} (no error body)")
                continue
            ok = r.status_code == case.status and set(error) == {"code", "message"}
            ok = ok and (case.code is None or error["code"] == case.code)
            ok = ok and all(s.lower() in error["message"].lower() for s in case.says)
            if not ok:
                wrong.append(label)
    assert not wrong, "\n".join(wrong)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"params": {"prompt": "'
        for _ in range(20):
            yield b"x" * 65536

    r = await fleet.http.post("/v1/tasks", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
    # A query's mistakes are said as a body's: the place, the rule and what was sent.
    r = await fleet.http.get("/v1/tasks", params={"limit": "abc"})
    assert r.status_code == 422 and r.json()["error"] == {
        "code": "invalid_request",
        "message": "query.limit: Input should be a valid integer, unable to parse string as an integer "
        "(got 'abc')",
    }
    # Nothing refused was recorded or queued.
    for task_id in ("bad-1", "bad-2"):
        assert (await fleet.http.get(f"/v1/tasks/{task_id}")).status_code == 404


def _key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


ALICE = {"authorization": "Bearer alice-secret"}
BOB = {"x-api-key": "bob-secret"}


async def test_tenants_ids_and_cancel(start_fleet: StartFleet, engine: Engine, models_dir: Path) -> None:
    settings = fleet_settings(engine, models_dir, dedicated_and_dynamic())
    settings.fleet.tenants = {
        _key_hash("alice-secret"): TenantConfig(name="alice"),
        _key_hash("bob-secret"): TenantConfig(name="bob", tier="paid"),
    }
    fleet = await start_fleet(settings=settings, agents=[])
    http = fleet.http
    r = await http.post("/v1/tasks", json=V1)
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    assert r.headers["www-authenticate"] == 'Bearer realm="sdfleet"', r.headers  # RFC 9110 §11.6.1
    r = await http.get("/v1/tasks/x", headers={"authorization": "Bearer guess"})
    assert r.status_code == 401 and r.json()["error"] == {
        "code": "unauthorized",
        "message": "unknown API key",
    }
    assert r.headers["www-authenticate"].startswith("Bearer")

    r = await http.get("/v1/tasks/no-such-task", headers=ALICE)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert "no-such-task" in r.json()["error"]["message"]

    body = {**V1, "id": "client-7"}
    first = await http.post("/v1/tasks", json=body, headers=ALICE)
    assert first.status_code == 202, first.text
    again = await http.post("/v1/tasks", json=body, headers=ALICE)
    assert again.status_code == 200 and again.json()["id"] == "client-7"
    assert again.json()["created_at"] == first.json()["created_at"]
    # Ids are per tenant: Bob's "client-7" is Bob's own task, and learns nothing of Alice's.
    bobs = await http.post("/v1/tasks", json=body, headers=BOB)
    assert bobs.status_code == 202 and bobs.json()["tenant"] == "bob", bobs.text
    assert bobs.json()["created_at"] != first.json()["created_at"]
    mine = await http.get("/v1/tasks/client-7", headers=ALICE)
    assert mine.json()["tenant"] == "alice" and mine.json()["created_at"] == first.json()["created_at"]

    cancelled = await http.post("/v1/tasks/client-7/cancel", headers=ALICE)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = await http.post("/v1/tasks/client-7/cancel", headers=ALICE)
    assert again.status_code == 409
    assert again.json()["error"]["message"] == "task client-7 cannot be cancelled: it was cancelled already"
    assert (await http.get("/v1/tasks/client-7", headers=BOB)).json()["state"] == "queued"
    assert (await http.post("/v1/tasks/client-7/cancel", headers=BOB)).json()["state"] == "cancelled"

    # An agent that receives a cancelled task acks and drops it without running it. The repeated
    # submit within the lease period was not published again: one message per tenant's task.
    agents = await start_fleet(agents=["sd15"], with_api=False, settings=fleet.settings)
    agent = agents.fleet.agents[0]
    for _ in range(100):
        if agent.processed >= 2:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    assert agent.processed == 2
    for tenant in ("alice", "bob"):
        record = await agent.parts.store.get(tenant, "client-7")
        assert record is not None and record.state is TaskState.CANCELLED
        assert record.attempts == 0 and record.result is None
    stats = await agent.parts.bus.stats("sd15")
    assert stats.visible == 0 and stats.in_flight == 0
