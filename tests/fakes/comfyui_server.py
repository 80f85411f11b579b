"""A protocol-faithful ComfyUI test server: its HTTP API and websocket, with a fake executor.

Follows ComfyUI's ``server.py`` (PromptServer routes) and the messages its executor sends:
``POST /prompt`` → ``{"prompt_id", "number", "node_errors"}`` (400 with ``error``/``node_errors`` when
invalid); ``POST /upload/image`` (multipart ``image``) → ``{"name", "subfolder", "type"}``;
``GET /history/{prompt_id}``; ``GET /view?filename=&subfolder=&type=``; ``POST /interrupt``;
``GET /system_stats``; websocket ``/ws?clientId=`` sending ``status`` on connect, then per prompt
``execution_start``, ``executing`` {node}, ``progress`` {value, max}, ``executed``,
``execution_success``, ``executing`` {node: null}, or ``execution_error`` / ``execution_interrupted``.

"Executing" a workflow: each KSampler steps through ``inputs.steps`` (``step_s`` apart); each
SaveImage writes a PNG of the EmptyLatentImage size; a node of class ``RaiseError`` fails.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


class FakeComfyUI:
    def __init__(self, step_s: float = 0.005) -> None:
        self.step_s = step_s
        self.inputs: dict[str, bytes] = {}
        self.outputs: dict[str, bytes] = {}
        self.history: dict[str, Any] = {}
        self.prompts: list[dict[str, Any]] = []
        self.sockets: dict[str, WebSocket] = {}
        self.interrupted = asyncio.Event()
        self.interrupts = 0
        self.number = 0
        self.app = Starlette(
            routes=[
                Route("/prompt", self.post_prompt, methods=["POST"]),
                Route("/upload/image", self.upload_image, methods=["POST"]),
                Route("/history/{prompt_id}", self.get_history),
                Route("/view", self.view),
                Route("/interrupt", self.interrupt, methods=["POST"]),
                Route("/system_stats", self.system_stats),
                WebSocketRoute("/ws", self.ws),
            ]
        )

    async def ws(self, websocket: WebSocket) -> None:
        sid = websocket.query_params.get("clientId") or uuid.uuid4().hex
        await websocket.accept()
        self.sockets[sid] = websocket
        await websocket.send_json(
            {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": sid}}
        )
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            self.sockets.pop(sid, None)

    async def send(self, sid: str | None, kind: str, data: dict[str, Any]) -> None:
        if sid in self.sockets:
            await self.sockets[sid].send_json({"type": kind, "data": data})

    async def upload_image(self, request: Request) -> JSONResponse:
        form = await request.form()
        upload = form["image"]
        assert not isinstance(upload, str)
        subfolder = str(form.get("subfolder") or "")
        name = upload.filename or "image.png"
        self.inputs[f"{subfolder}/{name}" if subfolder else name] = await upload.read()
        return JSONResponse({"name": name, "subfolder": subfolder, "type": str(form.get("type") or "input")})

    def _validate(self, prompt: dict[str, Any]) -> dict[str, Any]:
        errors: dict[str, Any] = {}
        for node_id, node in prompt.items():
            if node.get("class_type") == "LoadImage" and node["inputs"].get("image") not in self.inputs:
                errors[node_id] = {
                    "errors": [
                        {
                            "type": "custom_validation_failed",
                            "message": "Invalid image file",
                            "details": f"image - Invalid image file: {node['inputs'].get('image')}",
                        }
                    ],
                    "class_type": "LoadImage",
                }
        return errors

    async def post_prompt(self, request: Request) -> JSONResponse:
        body = await request.json()
        prompt = body.get("prompt")
        if not isinstance(prompt, dict):
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "", "extra_info": {}}
            return JSONResponse({"error": error, "node_errors": {}}, status_code=400)
        node_errors = self._validate(prompt)
        if node_errors:
            error = {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": "",
                "extra_info": {},
            }
            return JSONResponse({"error": error, "node_errors": node_errors}, status_code=400)
        prompt_id = str(uuid.uuid4())
        self.number += 1
        self.prompts.append(body)
        self.interrupted.clear()
        asyncio.get_running_loop().create_task(self.execute(prompt_id, prompt, body.get("client_id")))
        return JSONResponse({"prompt_id": prompt_id, "number": self.number, "node_errors": {}})

    async def execute(self, prompt_id: str, prompt: dict[str, Any], sid: str | None) -> None:
        await self.send(
            sid, "execution_start", {"prompt_id": prompt_id, "timestamp": int(time.time() * 1000)}
        )
        outputs: dict[str, Any] = {}
        for node_id, node in prompt.items():
            await self.send(
                sid, "executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id}
            )
            failure = await self._run_node(prompt_id, node_id, node, prompt, outputs, sid)
            if failure is not None:
                kind, data = failure
                await self.send(sid, kind, data)
                self.history[prompt_id] = {
                    "prompt": [self.number, prompt_id, prompt, {}, []],
                    "outputs": outputs,
                    "status": {"status_str": "error", "completed": False, "messages": []},
                }
                return
        self.history[prompt_id] = {
            "prompt": [self.number, prompt_id, prompt, {}, []],
            "outputs": outputs,
            "status": {"status_str": "success", "completed": True, "messages": []},
        }
        await self.send(
            sid, "execution_success", {"prompt_id": prompt_id, "timestamp": int(time.time() * 1000)}
        )
        await self.send(sid, "executing", {"node": None, "prompt_id": prompt_id})

    async def _run_node(
        self,
        prompt_id: str,
        node_id: str,
        node: dict[str, Any],
        prompt: dict[str, Any],
        outputs: dict[str, Any],
        sid: str | None,
    ) -> tuple[str, dict[str, Any]] | None:
        kind, inputs = node.get("class_type"), node.get("inputs", {})
        base = {"prompt_id": prompt_id, "node_id": node_id, "node_type": kind, "executed": list(outputs)}
        if kind == "RaiseError":
            return "execution_error", {
                **base,
                "exception_message": str(inputs.get("message", "boom")),
                "exception_type": str(inputs.get("type", "ValueError")),
                "traceback": [],
                "current_inputs": {},
                "current_outputs": {},
            }
        if kind == "KSampler":
            steps = int(inputs.get("steps", 20))
            for step in range(1, steps + 1):
                if self.interrupted.is_set():
                    return "execution_interrupted", base
                await asyncio.sleep(self.step_s)
                await self.send(
                    sid, "progress", {"value": step, "max": steps, "prompt_id": prompt_id, "node": node_id}
                )
        if kind == "SaveImage":
            images = self._save(prompt, inputs)
            outputs[node_id] = {"images": images}
            await self.send(
                sid,
                "executed",
                {
                    "node": node_id,
                    "display_node": node_id,
                    "output": {"images": images},
                    "prompt_id": prompt_id,
                },
            )
        return None

    def _save(self, prompt: dict[str, Any], inputs: dict[str, Any]) -> list[dict[str, str]]:
        latent = next((n["inputs"] for n in prompt.values() if n.get("class_type") == "EmptyLatentImage"), {})
        size = (int(latent.get("width", 64)), int(latent.get("height", 64)))
        colour = (len(self.inputs) * 40 % 256, 90, 160)
        images = []
        for n in range(int(latent.get("batch_size", 1))):
            name = f"{inputs.get('filename_prefix', 'ComfyUI')}_{len(self.outputs) + 1:05}_.png"
            buf = io.BytesIO()
            Image.new("RGB", size, (colour[0], colour[1], (colour[2] + n) % 256)).save(buf, format="PNG")
            self.outputs[name] = buf.getvalue()
            images.append({"filename": name, "subfolder": "", "type": "output"})
        return images

    async def get_history(self, request: Request) -> JSONResponse:
        prompt_id = request.path_params["prompt_id"]
        return JSONResponse({prompt_id: self.history[prompt_id]} if prompt_id in self.history else {})

    async def view(self, request: Request) -> Response:
        q = request.query_params
        store = self.outputs if q.get("type", "output") == "output" else self.inputs
        name = f"{q['subfolder']}/{q['filename']}" if q.get("subfolder") else q.get("filename", "")
        if name not in store:
            return Response(status_code=404)
        return Response(store[name], media_type="image/png")

    async def interrupt(self, request: Request) -> Response:
        self.interrupts += 1
        self.interrupted.set()
        return Response(status_code=200)

    async def system_stats(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {"system": {"os": "posix", "comfyui_version": "fake", "python_version": "3"}, "devices": []}
        )
