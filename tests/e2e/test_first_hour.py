"""The run of issue 17, replayed through the CLI as subprocesses at 80 columns, piped as a script
would: one tiny model in the folder, `sdfleet up`, a submit that names no model. It succeeds, every
path and link comes out whole on one line, the JSON forms parse, no progress bar is drawn into a pipe
and no warning is printed that does not apply."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port

pytestmark = pytest.mark.timeout(600)
SDFLEET = [sys.executable, "-m", "sdfleet"]
MODEL = "v1-5-pruned-emaonly.safetensors"


def _env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}
    env.update(
        COLUMNS="80", HF_HUB_OFFLINE="1", SDFLEET_API_URL=f"http://127.0.0.1:{port}", HOME=str(tmp_path)
    )
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SDFLEET, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_issue_run_succeeds_without_model_and_prints_whole_links(tmp_path: Path) -> None:
    port = free_port()
    env = _env(tmp_path, port)
    made = _run(["models", "make-tiny", MODEL], tmp_path, env)
    assert made.returncode == 0, made.stderr
    written = re.fullmatch(
        r"wrote tiny test model (\S+) \(random weights: its images are noise\)\n", made.stdout
    )
    assert written is not None, made.stdout
    assert (tmp_path / written.group(1) / "model_index.json").is_file()
    up = subprocess.Popen(
        [*SDFLEET, "up", "--port", str(port)], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}", up)
        # The issue's command, at a size the tiny model makes quickly on two busy cores (its default,
        # 512x512 in 20 steps, is what a real SD 1.5 model wants); no --model, as in the issue.
        small = ["--steps", "4", "--width", "64", "--height", "64"]
        submitted = _run(["submit", "--prompt", "a cat on a sofa", *small, "--wait"], tmp_path, env)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        _check_submit_output(submitted.stdout, tmp_path, port)
        _check_json_forms(tmp_path, env)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            _out, err = up.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert up.returncode == 0, err[-2000:]
    assert "WEBHOOK__SECRET" not in err, "no task asked for a webhook: no warning about its secret"


def _wait_ready(api: str, proc: subprocess.Popen[str], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if httpx.get(f"{api}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"sdfleet up was not ready within {timeout_s} s")


def _check_submit_output(out: str, cwd: Path, port: int) -> None:
    lines = out.splitlines()
    task_id = re.fullmatch(r"submitted (\w+)", lines[0])
    assert task_id is not None, out
    tid = task_id.group(1)
    assert "━" not in out, "no progress bar drawn into a pipe"
    assert f"{tid}: succeeded · queue default · model {MODEL}" in lines, out
    images = [m for line in lines if (m := re.fullmatch(r"  (\S+\.png)  (http://\S+)", line))]
    assert len(images) == 1, f"one image line, key and link whole on it:\n{out}"
    key, url = images[0].groups()
    assert url.startswith(f"http://127.0.0.1:{port}/v1/files/{key}?")
    fetched = httpx.get(url, timeout=30)
    assert fetched.status_code == 200 and fetched.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert (cwd / "sdfleet-data" / "files" / key).is_file()
    assert len(url) > 80, "the link is longer than the terminal is wide, and still on one line"


def _check_json_forms(cwd: Path, env: dict[str, str]) -> None:
    task = json.loads(_run(["submit", "--prompt", "a dog", "--steps", "2", "--json"], cwd, env).stdout)
    assert task["model"] == MODEL and task["state"] in ("queued", "running", "succeeded")
    view = json.loads(_run(["status", task["id"], "--json"], cwd, env).stdout)
    assert view["id"] == task["id"]
    queues = json.loads(_run(["queues", "--json"], cwd, env).stdout)
    assert [q["queue"] for q in queues] == ["default"] and queues[0]["dead_letters"] == 0
    models = json.loads(_run(["models", "list", "--json"], cwd, env).stdout)
    assert models["default"] == MODEL and [m["name"] for m in models["models"]] == [MODEL]
    refused = _run(["submit", "--prompt", "a dog", "--model", "nope.safetensors", "--json"], cwd, env)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "422" in refused.stderr and "nope.safetensors" in refused.stderr and MODEL in refused.stderr
