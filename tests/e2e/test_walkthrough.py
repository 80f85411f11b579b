"""The README's "After the demo" walkthrough, run as a person runs it: every command of its console
blocks in a shell, in order, in an empty folder, against real `sdfleet up` processes (on free ports
instead of 8080, the default, and 8081; a test redis-server instead of one on 6379), each output
held to the one the README shows. `SDFLEET_WALKTHROUGH_RECORD=FILE` writes what each command
printed, to refresh the README."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from readme_console import Step, Values, section, steps

from conftest import free_port

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
README = Path(__file__).resolve().parents[2] / "README.md"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}
    bin_dir = str(Path(sys.executable).parent)  # `sdfleet` and `python` of the venv under test
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", COLUMNS="80", HF_HUB_OFFLINE="1")
    env["HOME"] = str(tmp_path)  # nothing from the tester's own configuration
    return env


class Ports:
    """README ports → this run's (commands) and back (outputs)."""

    def __init__(self, mapping: dict[int, int]) -> None:
        self.mapping = mapping

    def to_run(self, text: str) -> str:
        return self._swap(text, {str(k): str(v) for k, v in self.mapping.items()})

    def to_readme(self, text: str) -> str:
        return self._swap(text, {str(v): str(k) for k, v in self.mapping.items()})

    @staticmethod
    def _swap(text: str, table: dict[str, str]) -> str:
        pattern = r"(?<=127\.0\.0\.1:)(\d+)\b|(?<=--port )(\d+)\b"
        return re.sub(pattern, lambda m: table.get(m.group(0), m.group(0)), text)


def test_after_the_demo_walkthrough(tmp_path: Path, redis_server: Any) -> None:
    walk = steps(section(README.read_text(), "After the demo"))
    assert len(walk) >= 10, "the walkthrough has its steps"
    ports = Ports({8080: free_port(), 8081: free_port(), 6379: redis_server.port})
    env, values, background = _env(tmp_path), Values(), []
    # The README's fleet listens on the default port: move the default, for `up` and for the CLI.
    env["SDFLEET_API__PORT"] = str(ports.mapping[8080])
    env["SDFLEET_API_URL"] = f"http://127.0.0.1:{ports.mapping[8080]}"
    record = os.environ.get("SDFLEET_WALKTHROUGH_RECORD")
    transcript: list[str] = []
    try:
        for step in walk:
            command = ports.to_run(values.apply(step.command))
            if step.background:
                background.append(_start(command, tmp_path, env))
                transcript.append(f"$ {step.command} &")
                continue
            done = subprocess.run(
                ["bash", "-o", "pipefail", "-c", command],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=300,
            )
            printed = ports.to_readme(done.stdout).splitlines()
            transcript += [f"$ {step.command}", *printed]
            _check(step, done.returncode, printed, values)
    finally:
        for proc in background:
            _stop(proc)
        if record:  # what ran, and which value of this run stands where the README shows one
            Path(record).write_text("\n".join(transcript) + "\n")
            Path(f"{record}.values.json").write_text(json.dumps(values.seen, indent=1))


def _start(command: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Its own process group: the shell and the fleet in it are stopped together, by that group's id.
    return subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the group (the fleet drains and exits), then wait until the whole group is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)


def _check(step: Step, rc: int, printed: list[str], values: Values) -> None:
    said = "\n".join(printed)
    refused = any(line.startswith("error:") for line in step.shown)  # a step that shows a refusal
    assert (rc != 0) == refused, f"`{step.command}` exited {rc}:\n{said}"
    assert values.match(step.shown, printed), (
        f"`{step.command}` printed\n{said}\n--- the README shows\n" + "\n".join(step.shown)
    )
