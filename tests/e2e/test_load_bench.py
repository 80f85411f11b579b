"""``sdfleet bench run load`` against ``sdfleet up`` (its own process, with an API key): a short
open-loop run of the default mix (v1 and both seed formats) and a closed-loop run of a mix file
with a bad entry. It checks what the scenario counts and writes, not how fast anything is."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from up_process import UpProcess, sdfleet_up

KEY = "load-test-key-0123"
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    from sdfleet.models.tiny import make_tiny

    work = tmp_path_factory.mktemp("load")
    make_tiny(work / "models", "tiny-load")  # listed by GET /v1/models; the synthetic runtime draws
    fleet = {
        "queues": [{"name": "default", "runtime": "synthetic"}],
        "runtimes": {"synthetic": {"latency_s": 0.05}},
        "models": {"dir": str(work / "models"), "default": "tiny-load"},
        "tenants": {hashlib.sha256(KEY.encode()).hexdigest(): {"name": "loader"}},
    }
    with sdfleet_up(work, fleet) as running:
        yield running


def load(*args: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-c",
        "from sdfleet.cli import main; main()",
        "bench",
        "run",
        "load",
        "--",
        *args,
    ]
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def test_default_mix_open_loop(up: UpProcess, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    run = load("--api-url", up.url, "--api-key", KEY, "--rate", "4", "--duration", "3", "--output", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    result: dict[str, Any] = json.loads(out.read_text())
    total = result["all"]
    assert total["attempted"] == 12  # 4/s for 3 s, on schedule
    assert total["submitted"] == total["succeeded"] == 12 and total["errors"] == {}
    assert set(result["by_entry"]) <= {"v1", "seed-v1alpha1", "seed-v1alpha2"}
    assert sum(e["attempted"] for e in result["by_entry"].values()) == 12
    for stats in (total["submit_latency_s"], total["e2e_latency_s"]):
        assert 0 < stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"]
    assert total["e2e_latency_s"]["p50"] >= total["submit_latency_s"]["p50"]
    assert total["throughput_per_s"] > 0
    assert result["settings"]["model"] == "tiny-load" and "api_key" not in result["settings"]
    assert "throughput" in run.stdout and f"wrote {out}" in run.stdout


def test_mix_file_closed_loop_counts_errors_by_code(up: UpProcess, tmp_path: Path) -> None:
    mix = [
        {
            "name": "good",
            "weight": 1,
            "format": "v1",
            "body": {"model": "$MODEL", "params": {"prompt": "ok", "steps": 2}},
        },
        {"name": "bad", "weight": 1, "format": "v1", "body": {"params": {"prompt": "x", "steps": 0}}},
    ]
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    out = tmp_path / "load.json"
    run = load(
        "--api-url",
        up.url,
        "--api-key",
        KEY,
        "--users",
        "2",
        "--duration",
        "2",
        "--follow",
        "poll",
        "--mix",
        str(tmp_path / "mix.yaml"),
        "--output",
        str(out),
    )
    assert run.returncode == 1, run.stdout + run.stderr  # errors happened
    result = json.loads(out.read_text())
    good, bad = result["by_entry"]["good"], result["by_entry"]["bad"]
    assert good["attempted"] > 0 and good["succeeded"] == good["attempted"] and good["errors"] == {}
    assert bad["attempted"] > 0 and bad["errors"] == {"http_422:invalid_request": bad["attempted"]}
    assert bad["submitted"] == 0


def test_a_wrong_key_is_an_error_per_task(up: UpProcess, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    run = load(
        "--api-url",
        up.url,
        "--api-key",
        "wrong",
        "--model",
        "tiny-load",
        "--users",
        "1",
        "--duration",
        "0.5",
        "--output",
        str(out),
    )
    assert run.returncode == 1
    errors = json.loads(out.read_text())["all"]["errors"]
    assert list(errors) == ["http_401:unauthorized"]
