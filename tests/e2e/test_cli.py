"""The command line as a person uses it: subprocesses, real HTTP, the README's commands."""

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
import yaml

from conftest import SD15, free_port
from sdfleet.models.tiny import make_tiny

pytestmark = pytest.mark.timeout(300)
SDFLEET = [sys.executable, "-m", "sdfleet"]


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SDFLEET, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "SDFLEET_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "80"}
    env["SDFLEET_LOG_JSON"] = "true"
    return env


def test_models_make_tiny_and_list(tmp_path: Path, cli_env: dict[str, str]) -> None:
    made = _run(["models", "make-tiny", "cli-tiny", "--dir", str(tmp_path / "models")], cli_env)
    assert made.returncode == 0, made.stderr
    assert "noise" in made.stdout  # a person is told the images are noise
    config = tmp_path / "sdfleet.yaml"
    config.write_text(yaml.safe_dump({"models": {"dir": str(tmp_path / "models")}}))
    listed = _run(["models", "list", "-c", str(config)], cli_env)
    assert listed.returncode == 0, listed.stderr
    assert "cli-tiny" in listed.stdout and "diffusers" in listed.stdout and "yes" in listed.stdout


def test_up_submit_status_queues(tmp_path: Path, cli_env: dict[str, str]) -> None:
    make_tiny(tmp_path / "models", Path(SD15).stem)
    config = tmp_path / "sdfleet.yaml"
    fleet = {
        "queues": [{"name": "sd15", "filter": {"sd_model_checkpoint": [SD15]}}],
        "models": {"dir": str(tmp_path / "models"), "default": SD15},
    }
    config.write_text(yaml.safe_dump(fleet))
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    up = subprocess.Popen(
        [*SDFLEET, "up", "-c", str(config), "--port", str(port)],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_ready(api, up)
        submitted = _run(
            [
                "submit",
                "--prompt",
                "a boat",
                "--steps",
                "2",
                "--width",
                "64",
                "--height",
                "64",
                "--wait",
                "--api",
                api,
            ],
            cli_env,
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        task_id = re.search(r"submitted (\S+)", submitted.stdout)
        assert task_id is not None, submitted.stdout
        assert "succeeded" in submitted.stdout
        assert re.search(rf"{task_id.group(1)}-[0-9a-f]{{4}}-1\.png", submitted.stdout), submitted.stdout
        status = _run(["status", task_id.group(1), "--api", api, "--json"], cli_env)
        assert status.returncode == 0, status.stderr
        view = json.loads(status.stdout)
        assert view["state"] == "succeeded" and view["queue"] == "sd15"
        queues = _run(["queues", "-c", str(config)], cli_env)
        assert queues.returncode == 0, queues.stderr
        assert re.search(r"sd15\s+.*diffusers\s+.*0\s+.*0", queues.stdout), queues.stdout
        missing = _run(["status", "no-such-task", "--api", api], cli_env)
        assert missing.returncode == 2 and "not found" in missing.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        _out, err = up.communicate(timeout=60)
    assert up.returncode == 0, err[-2000:]
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in logs)


def _wait_ready(api: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if httpx.get(f"{api}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("sdfleet up did not become ready")


def test_demo_prints_two_pngs_of_the_asked_sizes(tmp_path: Path, cli_env: dict[str, str]) -> None:
    demo = _run(["demo", "--data-dir", str(tmp_path / "demo")], cli_env, timeout=280)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    # One line per image, its path whole at 80 columns; piped, no progress bars and no warnings
    found = re.findall(r"^\S+: (\S+\.png) \((\d+)x(\d+) PNG, queue \w+\)$", demo.stdout, flags=re.M)
    assert [(int(w), int(h)) for _, w, h in found] == [(768, 768), (512, 512)], demo.stdout
    for path, _, _ in found:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "noise from a tiny test model" in demo.stdout
    assert "━" not in demo.stdout and "warning" not in demo.stderr.lower(), demo.stderr
