"""``sdfleet demo``: the whole flow on one machine, no cloud, no download.

API → tasks topic → filter policies → ``sd15`` / ``dynamic`` queues → agents → diffusers (a tiny
random-weight model built here) → local storage → results topic, driven by the seed's own two
example requests sent to its ``/v1alpha1/`` endpoint.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sdfleet.client import TERMINAL, AsyncClient
from sdfleet.compat.examples import SEED_CHECKPOINT, V1ALPHA1_I2I, V1ALPHA1_T2I
from sdfleet.settings import AgentSettings, ApiSettings, FleetConfig, ModelsConfig, QueueConfig, Settings
from sdfleet.tasks import TaskParams

TINY_NOTE = "random weights: the images are noise from a tiny test model, not a real picture"


def demo_fleet(models_dir: Path) -> FleetConfig:
    """A dedicated queue for the seed's checkpoint and a dynamic queue for every other model."""
    return FleetConfig(
        queues=[
            QueueConfig(
                name="sd15", filter={"sd_model_checkpoint": [SEED_CHECKPOINT]}, model=SEED_CHECKPOINT
            ),
            QueueConfig(
                name="dynamic", filter={"sd_model_checkpoint": [{"anything-but": [SEED_CHECKPOINT]}]}
            ),
        ],
        models=ModelsConfig(dir=models_dir, default=SEED_CHECKPOINT),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _input_image() -> bytes:
    """A small landscape-ish gradient: the demo's stand-in for the seed's img2img input picture."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (512, 512))
    draw = ImageDraw.Draw(img)
    for y in range(512):
        draw.line([(0, y), (511, y)], fill=(40 + y // 4, 80 + y // 6, 200 - y // 4))
    draw.polygon([(0, 400), (180, 250), (330, 380), (511, 220), (511, 511), (0, 511)], fill=(40, 90, 50))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class ImageServer:
    """Serves the input image on 127.0.0.1, so the demo needs no internet."""

    def __init__(self, data: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/landscape.png"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def demo_settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        api=ApiSettings(port=_free_port()),
        agent=AgentSettings(allow_private_inputs=True, wait_s=1.0),
        fleet=demo_fleet(data_dir / "models"),
        log_json=False,
        log_level="WARNING",
    )


def _ensure_model(models_dir: Path, console: Console) -> None:
    from sdfleet.models.tiny import make_tiny

    name = Path(SEED_CHECKPOINT).stem
    if (models_dir / name).exists():
        return
    with console.status(f"building tiny test model {name!r} (random weights, no download)"):
        make_tiny(models_dir, name)


def _payloads(image_url: str) -> list[dict[str, Any]]:
    run = time.strftime("%H%M%S")
    out = []
    # The text-to-image request as the product brief shows it (30 steps at 768x768); the seed's
    # test file has the same request at 16 steps and 512x512.
    txt2img = {**V1ALPHA1_T2I, "steps": 30, "width": 768, "height": 768}
    for example in (txt2img, V1ALPHA1_I2I):
        body: dict[str, Any] = {**example, "alwayson_scripts": dict(example["alwayson_scripts"])}
        scripts = body["alwayson_scripts"]
        scripts["id_task"] = f"{scripts['id_task']}-{run}"  # a new task each run (ids are idempotency keys)
        if "image_link" in scripts:
            scripts["image_link"] = image_url
        out.append(body)
    return out


@dataclass(frozen=True)
class OwnModel:
    """``sdfleet demo --model NAME``: a model of the models folder instead of the tiny one."""

    name: str
    models_dir: Path
    steps: int | None = None
    size: int = 512
    cfg_scale: float | None = None

    def __post_init__(self) -> None:
        # pydantic's ValidationError now, before the fleet starts and loads the model, rather than
        # the API's 422 after it; the size is checked once, as the width (the height is the same).
        steps, cfg = self.recipe()
        TaskParams(steps=steps, width=self.size, cfg_scale=cfg)

    def recipe(self) -> tuple[int, float]:
        """Steps and CFG scale: as given, else the SD/SDXL-Turbo recipe for a ``turbo`` model
        (2 steps, no guidance), else a usual SD one (25 steps, 7)."""
        turbo = "turbo" in self.name.lower()
        steps = self.steps if self.steps is not None else (2 if turbo else 25)
        cfg = self.cfg_scale if self.cfg_scale is not None else (0.0 if turbo else 7.0)
        return steps, cfg


def own_model_settings(data_dir: Path, own: OwnModel) -> Settings:
    """One queue that keeps ``own`` loaded; the seed's requests are sent for it."""
    from sdfleet.models.catalog import ModelCatalog

    info = ModelCatalog(own.models_dir.resolve()).resolve(own.name)  # NotFound lists what there is
    settings = demo_settings(data_dir)
    settings.fleet = FleetConfig(
        queues=[QueueConfig(name="default", model=info.name)],
        models=ModelsConfig(dir=own.models_dir.resolve(), default=info.name),
    )
    return settings


def own_payloads(own: OwnModel, image_url: str) -> list[dict[str, Any]]:
    name = own.name
    steps, cfg = own.recipe()
    out = []
    for body in _payloads(image_url):
        body["alwayson_scripts"]["sd_model_checkpoint"] = name
        body["alwayson_scripts"].pop("sd_vae", None)
        body.update(steps=steps, cfg_scale=cfg, width=own.size, height=own.size)
        if body["alwayson_scripts"]["task"] == "image-to-image":
            body["steps"] = max(steps, 2)  # turbo img2img: steps × strength must reach one step
        out.append(body)
    return out


async def run_demo(data_dir: Path, console: Console, own: OwnModel | None = None) -> list[Path]:
    from sdfleet.serve import Fleet
    from sdfleet.telemetry import setup_logging

    data_dir = data_dir.resolve()
    settings = demo_settings(data_dir) if own is None else own_model_settings(data_dir, own)
    setup_logging(settings.log_level, json_logs=False)
    if own is None:
        await asyncio.to_thread(_ensure_model, settings.fleet.models.dir, console)
    images = ImageServer(_input_image())
    fleet = Fleet(settings, [q.name for q in settings.fleet.queues])
    running = asyncio.create_task(fleet.run())
    try:
        await _until_started(fleet, running)
        api_url = f"http://127.0.0.1:{settings.api.port}"
        queues = "sd15 (dedicated), dynamic" if own is None else f"default (model {own.name})"
        console.print(f"API on {api_url} · queues {queues} · data in {data_dir}", soft_wrap=True)
        payloads = _payloads(images.url) if own is None else own_payloads(own, images.url)
        async with AsyncClient(api_url) as client:
            ids = [await client.submit_raw(p, fmt="v1alpha1") for p in payloads]
            views = await _watch(client, ids, console)
        return _report(views, data_dir, console, tiny=own is None or _is_tiny(settings, own))
    finally:
        fleet.stop()
        await running
        images.close()


async def _until_started(fleet: Any, running: asyncio.Task[None]) -> None:
    waiter = asyncio.create_task(fleet.started.wait())
    await asyncio.wait({waiter, running}, return_when=asyncio.FIRST_COMPLETED)
    if running.done():
        waiter.cancel()
        running.result()  # raises what stopped the fleet


async def _watch(client: AsyncClient, ids: list[str], console: Console) -> list[dict[str, Any]]:
    if not console.is_terminal:  # piped: no bars, just the outcome
        return [await client.wait(i, poll_s=0.2) for i in ids]
    columns = (TextColumn("{task.description:<40}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"))
    views: dict[str, dict[str, Any]] = {}
    with Progress(*columns, TimeElapsedColumn(), console=console) as bar:
        handles = {i: bar.add_task(f"{i} queued", total=1.0) for i in ids}
        while len(views) < len(ids):
            for i in ids:
                if i in views:
                    continue
                view = await client.poll(i)
                bar.update(handles[i], completed=view["progress"], description=f"{i} {view['state']}")
                if view["state"] in TERMINAL:
                    views[i] = view
            await asyncio.sleep(0.2)
    return [views[i] for i in ids]


def _is_tiny(settings: Settings, own: OwnModel) -> bool:
    from sdfleet.models.catalog import ModelCatalog

    return ModelCatalog(settings.fleet.models.dir).resolve(own.name).tiny


def _report(views: list[dict[str, Any]], data_dir: Path, console: Console, tiny: bool = True) -> list[Path]:
    from PIL import Image

    paths: list[Path] = []
    for view in views:
        if view["state"] != "succeeded":
            console.print(f"[red]{view['id']} {view['state']}[/red]: {view.get('error')}", soft_wrap=True)
            continue
        for image in view["images"]:
            path = data_dir / "files" / image["key"]
            with Image.open(path) as im:
                size = f"{im.width}x{im.height}"
            line = f"{view['id']}: [bold]{path}[/bold] ({size} PNG, queue {view['queue']})"
            console.print(line, soft_wrap=True)  # a path is copied whole: never folded
            paths.append(path)
    if tiny:
        console.print(f"[dim]{TINY_NOTE}[/dim]")
    return paths
