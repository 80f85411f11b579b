"""Tenant limits and stored keys across API replicas (issue 12, defect 6 and keys as data): two
``sdfleet api`` processes on one engine share each tenant's rate and in-flight limits (429 with
``Retry-After``), and a key made or revoked with ``sdfleet keys`` works or stops on both."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from fleet_tools import write_fleet_file

from conftest import Engine, free_port, subprocess_env

# flows of the fleet's own logic: redis and aws in `make test-slow` (tests/conftest.py)
pytestmark = [pytest.mark.timeout(300), pytest.mark.flow]

LIMITED, BUSY = "limited-key", "busy-key"
PARAMS = {"prompt": "a bridge", "steps": 2, "width": 64, "height": 64}
CACHE_S = 0.5


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def fleet_file(tmp_path: Path) -> Path:
    return write_fleet_file(
        tmp_path / "sdfleet.yaml",
        {
            "queues": [{"name": "q", "runtime": "synthetic"}],
            "tenants": {
                _hash(LIMITED): {"name": "lim", "rate_limit": 0.5, "burst": 3},
                _hash(BUSY): {"name": "busy", "max_in_flight": 2},
            },
        },
    )


def _env(engine: Engine, fleet_file: Path) -> dict[str, str]:
    env = subprocess_env(engine, fleet_file)
    env.update({"SDFLEET_API__KEY_CACHE_S": str(CACHE_S), "SDFLEET_LOG_JSON": "false"})
    return env


@contextmanager
def api_process(engine: Engine, fleet_file: Path) -> Iterator[str]:
    """One ``sdfleet api`` replica on a free port; killed at exit."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdfleet", "api", "--port", str(port)],
        env=_env(engine, fleet_file),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"sdfleet api exited with {proc.returncode}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout_s} s")


@pytest.fixture
def replicas(engine: Engine, fleet_file: Path) -> Iterator[tuple[str, str]]:
    with ExitStack() as stack:
        a = stack.enter_context(api_process(engine, fleet_file))
        b = stack.enter_context(api_process(engine, fleet_file))
        yield a, b


async def _submit(url: str, key: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(f"{url}/v1/tasks", json={"params": PARAMS}, headers={"x-api-key": key})


@pytest.mark.flow(engines="all")  # the counters are the store's
async def test_rate_and_in_flight_limits_are_shared_by_two_replicas(replicas: tuple[str, str]) -> None:
    a, b = replicas
    # rate 0.5/s with a burst of 3: three accepted across both replicas, then refused on either
    answers = [await _submit(url, LIMITED) for url in (a, b, a, b)]
    assert [r.status_code for r in answers] == [202, 202, 202, 429], [r.text for r in answers]
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 2
    assert (await _submit(a, LIMITED)).status_code == 429
    await asyncio.sleep(int(refused.headers["retry-after"]) + 0.1)
    assert (await _submit(a, LIMITED)).status_code == 202, "a token came back after Retry-After"

    # at most two queued or running (no agent runs them): the third is refused, on either replica
    first, second = await _submit(a, BUSY), await _submit(b, BUSY)
    assert (first.status_code, second.status_code) == (202, 202)
    for url in (a, b):
        third = await _submit(url, BUSY)
        assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_in_flight", third.text
        assert third.headers["retry-after"] == "1"
    async with httpx.AsyncClient(timeout=30) as http:
        cancel = await http.post(f"{b}/v1/tasks/{first.json()['id']}/cancel", headers={"x-api-key": BUSY})
    assert cancel.status_code == 200
    assert (await _submit(a, BUSY)).status_code == 202, "a finished task frees a slot for every replica"


def _keys(engine: Engine, fleet_file: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "sdfleet", "keys", *args],
        env={**_env(engine, fleet_file), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def _status_everywhere(urls: tuple[str, ...], key: str) -> set[int]:
    async with httpx.AsyncClient(timeout=30) as http:
        answers = [
            await http.get(f"{url}/v1/tasks", headers={"authorization": f"Bearer {key}"}) for url in urls
        ]
    return {r.status_code for r in answers}


async def _until(urls: tuple[str, ...], key: str, status: int, within_s: float) -> float:
    t0 = time.monotonic()
    while (got := await _status_everywhere(urls, key)) != {status}:
        assert time.monotonic() - t0 < within_s, f"still {got} after {within_s} s"
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


async def test_keys_made_and_revoked_with_the_cli_take_effect_on_every_replica(
    engine: Engine, fleet_file: Path, replicas: tuple[str, str]
) -> None:
    out = _keys(
        engine,
        fleet_file,
        "create",
        "--tenant",
        "carol",
        "--tier",
        "paid",
        "--max-in-flight",
        "5",
        "--max-priority",
        "1",
    )
    key = out.strip().splitlines()[-1]
    assert key.startswith("sdf_"), out
    assert await _until(replicas, key, 200, within_s=10) < 10
    listed = json.loads(_keys(engine, fleet_file, "list", "--json"))  # one document
    [mine] = [k for k in listed if k["tenant"] == "carol"]
    assert mine["tier"] == "paid" and mine["max_in_flight"] == 5 and mine["revoked_at"] is None
    assert mine["max_priority"] == 1
    assert "digest" not in mine and key not in json.dumps(listed), "neither the key nor its hash is shown"
    assert (await _submit(replicas[0], key)).json()["tenant"] == "carol"
    async with httpx.AsyncClient(timeout=30) as http:
        urgent = {"params": PARAMS, "priority": 2}
        r = await http.post(f"{replicas[1]}/v1/tasks", json=urgent, headers={"x-api-key": key})
    assert r.status_code == 403 and r.json()["error"]["code"] == "priority_not_allowed", r.text

    revoked = _keys(engine, fleet_file, "revoke", mine["id"])  # its time as every command writes one
    assert re.search(r"revoked at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", revoked.strip()), revoked
    took = await _until(replicas, key, 401, within_s=CACHE_S + 5)
    assert took <= CACHE_S + 5
    listed = json.loads(_keys(engine, fleet_file, "list", "--json"))  # one document
    assert all(k["revoked_at"] is not None for k in listed if k["id"] == mine["id"])


def test_keys_cli_refuses_bad_input(engine: Engine, fleet_file: Path) -> None:
    for args in (
        ["create", "--tenant", "a/b"],
        ["create", "--tenant", "x", "--rate", "-1"],
        ["create", "--tenant", "x", "--max-priority", "10"],
        ["revoke", "nope"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "sdfleet", "keys", *args],
            env=_env(engine, fleet_file),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2 and "error" in done.stderr, (args, done.stdout, done.stderr)
