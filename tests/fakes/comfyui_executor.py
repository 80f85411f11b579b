"""The executor of the ComfyUI test server: runs one queued prompt as ComfyUI 0.3.64 does, message
by message (``execution.py``'s ``PromptExecutor`` and ``main.py``'s ``prompt_worker``).

``execution_start``, ``execution_cached``, per node ``executing`` (``progress`` per KSampler step,
``executed`` per output), then ``execution_success`` / ``execution_error`` /
``execution_interrupted``; the ``/history`` entry ``history_delay_s`` later (ComfyUI's
``task_done()`` runs after the executor returns), then ``executing {node: null}``. The interrupt
flag is ComfyUI's global one: checked before each node and each step, cleared when a prompt starts.
"""

from __future__ import annotations

import asyncio
import io
import posixpath
import random
import time
from typing import Any

from PIL import Image

from fakes.comfyui_graph import execution_order, upstream_of

ANIMATED = {"SaveAnimatedWEBP": ("images", "WEBP"), "VHS_VideoCombine": ("gifs", "GIF")}

Item = tuple[float, str, dict[str, Any], dict[str, Any], list[str]]
"""A queue entry as ComfyUI keeps it: (number, prompt_id, prompt, extra_data, outputs_to_execute)."""
Failure = tuple[str, dict[str, Any]]


def _ms() -> int:
    return int(time.time() * 1000)


class FakeExecutor:
    """Mixed into ``FakeComfyUI``, whose state (files, history, flags, sockets) it uses."""

    step_s: float
    history_delay_s: float
    files: dict[str, dict[str, bytes]]
    history: dict[str, Any]
    running: Item | None
    client_id: str | None
    interrupt_flag: bool
    paused: bool

    async def send(self, sid: str | None, kind: str, data: dict[str, Any]) -> None:
        raise NotImplementedError

    async def _execute(self, item: Item) -> None:
        number, prompt_id, prompt, extra, outputs = item
        self.client_id = extra.get("client_id")
        self.interrupt_flag = False
        messages: list[list[Any]] = []

        async def add(kind: str, data: dict[str, Any], broadcast: bool = False) -> None:
            data = {**data, "timestamp": _ms()}
            messages.append([kind, data])
            if self.client_id is not None or broadcast:
                await self.send(self.client_id, kind, data)

        await add("execution_start", {"prompt_id": prompt_id})
        await add("execution_cached", {"nodes": [], "prompt_id": prompt_id})
        ui: dict[str, Any] = {}
        failure = None
        for node_id in execution_order(prompt, outputs):
            failure = await self._node(prompt_id, node_id, prompt, ui)
            if failure is not None:
                break
        if failure is None:
            await add("execution_success", {"prompt_id": prompt_id})
        else:
            await add(failure[0], failure[1], broadcast=failure[0] == "execution_interrupted")
        await asyncio.sleep(self.history_delay_s)  # ComfyUI's task_done() runs after the executor returns
        status = {"status_str": "error" if failure else "success", "completed": failure is None}
        self.history[prompt_id] = {
            "prompt": [number, prompt_id, prompt, extra, outputs],
            "outputs": ui,
            "status": {**status, "messages": messages},
            "meta": {node: {"node_id": node, "display_node": node} for node in ui},
        }
        self.running = None
        if self.client_id is not None:
            await self.send(self.client_id, "executing", {"node": None, "prompt_id": prompt_id})

    async def _node(
        self, prompt_id: str, node_id: str, prompt: dict[str, Any], ui: dict[str, Any]
    ) -> Failure | None:
        kind, inputs = prompt[node_id]["class_type"], prompt[node_id].get("inputs") or {}
        base = {"prompt_id": prompt_id, "node_id": node_id, "node_type": kind, "executed": list(ui)}
        if self.interrupt_flag:
            return "execution_interrupted", base
        await self.send(
            self.client_id, "executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id}
        )
        if kind == "RaiseError":
            error = {
                "exception_message": str(inputs.get("message", "boom")),
                "exception_type": str(inputs.get("type", "ValueError")),
                "traceback": ["Traceback (most recent call last):\n"],
                "current_inputs": {},
                "current_outputs": [],
            }
            return "execution_error", {**base, **error}
        if kind == "KSampler" and not await self._sample(prompt_id, node_id, int(inputs.get("steps", 20))):
            return "execution_interrupted", base
        if kind in ANIMATED:  # core's animated WebP under "images"; VideoHelperSuite's under "gifs"
            key, fmt = ANIMATED[kind]
            ui[node_id] = {key: self._save(prompt, node_id, kind, fmt)}
        if kind in ("SaveImage", "PreviewImage"):
            ui[node_id] = {"images": self._save(prompt, node_id, kind)}
        if node_id in ui:
            output = {"node": node_id, "display_node": node_id, "output": ui[node_id], "prompt_id": prompt_id}
            await self.send(self.client_id, "executed", output)
        return None

    async def _sample(self, prompt_id: str, node_id: str, steps: int) -> bool:
        """False when interrupted."""
        for step in range(1, steps + 1):
            if self.interrupt_flag:
                return False
            await asyncio.sleep(self.step_s)
            progress = {"value": step, "max": steps, "prompt_id": prompt_id, "node": node_id}
            await self.send(self.client_id, "progress", progress)
            while self.paused and not self.interrupt_flag:
                await asyncio.sleep(self.step_s)
        return True

    def _save(
        self, prompt: dict[str, Any], node_id: str, kind: str, fmt: str = "PNG"
    ) -> list[dict[str, str]]:
        latent = upstream_of(prompt, node_id, "EmptyLatentImage") or {}
        sampler = upstream_of(prompt, node_id, "KSampler") or {}
        size = (int(latent.get("width", 64)), int(latent.get("height", 64)))
        rng = random.Random(int(sampler.get("seed", 0)))
        folder = "temp" if kind == "PreviewImage" else "output"
        prefix = str(prompt[node_id]["inputs"].get("filename_prefix", "ComfyUI"))
        if kind == "PreviewImage":
            prefix = "ComfyUI_temp_" + "".join(rng.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
        subfolder, name = posixpath.split(posixpath.normpath(prefix))
        images = []
        frames = 1 if fmt == "PNG" else int(latent.get("batch_size", 1))
        for _ in range(int(latent.get("batch_size", 1)) if fmt == "PNG" else 1):
            buf = io.BytesIO()
            pictures = [
                Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3))) for _ in range(frames)
            ]
            pictures[0].save(buf, format=fmt, save_all=fmt != "PNG", append_images=pictures[1:])
            counter = 1 + sum(1 for key in self.files[folder] if posixpath.basename(key).startswith(name))
            filename = f"{name}_{counter:05}_.{fmt.lower()}"
            self.files[folder][posixpath.join(subfolder, filename)] = buf.getvalue()
            images.append({"filename": filename, "subfolder": subfolder, "type": folder})
        return images
