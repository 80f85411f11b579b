"""``sdfleet runtime serve`` as a person starts it: a subprocess, no model named, a client's first
txt2img answered with an image (SD WebUI starts with a checkpoint loaded), stopped by PID."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from conftest import free_port
from sdfleet.models.tiny import make_tiny

pytestmark = pytest.mark.timeout(300)


def pixels(b64: str) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(b64))).tobytes()


def test_runtime_serve_starts_with_the_first_model_loaded(tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_tiny(models, "b-second", seed=1)
    make_tiny(models, "a-first", seed=0)
    config = tmp_path / "sdfleet.yaml"
    config.write_text(yaml.safe_dump({"models": {"dir": str(models)}}))  # no models.default
    port = free_port()
    env = {**os.environ, "SDFLEET_DATA_DIR": str(tmp_path / "data")}
    args = ["runtime", "serve", "-c", str(config), "--port", str(port), "--device", "cpu", "--sdwebui-status"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen([sys.executable, "-m", "sdfleet", *args], env=env, stderr=out)
    url = f"http://127.0.0.1:{port}/sdapi/v1"
    try:
        deadline = time.monotonic() + 240
        while True:  # the server answers once its lifespan has loaded a checkpoint
            try:
                options = httpx.get(f"{url}/options", timeout=5).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert options["sd_model_checkpoint"].startswith("a-first [")
        answer = httpx.post(
            f"{url}/txt2img", json={"prompt": "a cat", "steps": 2, "width": 64, "height": 64}, timeout=120
        )
        assert answer.status_code == 200
        assert Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).size == (64, 64)
        # a LoRA the folder lacks: SD WebUI runs without it, and so does runtime serve by default
        seed = json.loads(answer.json()["info"])["seed"]
        body = {"prompt": "a cat <lora:not-here:0.7>", "steps": 2, "width": 64, "height": 64, "seed": seed}
        tagged = httpx.post(f"{url}/txt2img", json=body, timeout=120)
        assert tagged.status_code == 200, tagged.text
        assert pixels(tagged.json()["images"][0]) == pixels(answer.json()["images"][0])
        flags = httpx.get(f"{url}/cmd-flags").json()
        assert (flags["port"], flags["ckpt_dir"]) == (str(port), str(models))
        bad = httpx.post(f"{url}/extra-single-image", json={"image": "", "upscaler_1": "Lanczos"})
        assert bad.status_code == 500 and bad.json()["detail"] == "Invalid encoded image"  # SD WebUI's status
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
