"""``sdfleet up`` in its own process, as a user runs it: a fleet file, a data folder, a free port;
ready once ``/readyz`` answers 200; stopped by PID (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml


@dataclass
class UpProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def sdfleet_up(work: Path, fleet: dict[str, Any], env: dict[str, str] | None = None) -> Iterator[UpProcess]:
    fleet_file = work / "sdfleet.yaml"
    fleet_file.write_text(yaml.safe_dump(fleet))
    port = _free_port()
    full_env = {
        **os.environ,
        "SDFLEET_CONFIG_FILE": str(fleet_file),
        "SDFLEET_DATA_DIR": str(work / "data"),
        "SDFLEET_AGENT__WAIT_S": "0.5",
        "SDFLEET_LOG_JSON": "false",
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    log = work / "sdfleet-up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from sdfleet.cli import main; main()", "up", "--port", str(port)],
            env=full_env,
            cwd=work,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = UpProcess(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{running.url}/readyz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield running
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
