"""A runtime without torch: fixed-latency, deterministic PNGs, for benchmarks and tests of the fleet.

Images are real PNGs of the asked size and count, drawn with PIL from a hash of seed + prompt, so the
same job gives the same bytes. Interrupts, progress and model switches behave like a real runtime.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import time
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageDraw

from sdfleet import variation
from sdfleet.errors import Interrupted, Reject
from sdfleet.models.catalog import ModelCatalog
from sdfleet.runtimes.base import Job, ProgressFn, RuntimeResult
from sdfleet.runtimes.unsupported import refuse_kind
from sdfleet.tasks import TaskParams, TaskType


def synthetic_png(params: TaskParams, seed: int, size: tuple[int, int] | None = None) -> bytes:
    """A deterministic picture for ``(seed, prompt)``: a colour field with a few shapes."""
    width, height = size or (params.width, params.height)
    digest = hashlib.sha256(f"{seed}\0{params.prompt}\0{params.negative_prompt}".encode()).digest()
    rng = random.Random(digest)
    image = Image.new("RGB", (width, height), tuple(digest[:3]))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, x1 = sorted(rng.randrange(width + 1) for _ in range(2))
        y0, y1 = sorted(rng.randrange(height + 1) for _ in range(2))
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _scaled(data: bytes, params: TaskParams) -> tuple[int, int]:
    """The input image's size times ``upscaling_resize`` (the asked size when it is unreadable)."""
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Exception:
        width, height = params.width, params.height
    return max(1, round(width * params.upscaling_resize)), max(1, round(height * params.upscaling_resize))


class SyntheticRuntime:
    """Sleeps ``latency_s`` per job (in ``progress_steps`` slices), then returns synthetic images."""

    name = "synthetic"
    max_in_flight = 2
    """Like a real device: one job at a time under ``_gpu``, the next one waiting for it."""

    def __init__(
        self,
        latency_s: float = 0.5,
        *,
        switch_latency_s: float = 0.0,
        progress_steps: int = 10,
        default_model: str | None = None,
        catalog: ModelCatalog | None = None,
    ) -> None:
        self.latency_s = latency_s
        self.switch_latency_s = switch_latency_s
        self.progress_steps = max(1, progress_steps)
        self.default_model = default_model
        self.catalog = catalog
        """When given, job models are resolved against it (unknown → ``Reject``); else any name goes."""
        self.switches = 0
        self._current: str | None = None
        self._stops: dict[str, asyncio.Event] = {}
        self._gpu = asyncio.Lock()
        """One job at a time, like the one GPU it stands for."""

    @classmethod
    def from_options(
        cls,
        *,
        catalog: ModelCatalog,
        options: Mapping[str, Any],
        default_model: str | None = None,
        cache_size: int = 2,
    ) -> SyntheticRuntime:
        return cls(
            latency_s=float(options.get("latency_s", 0.5)),
            switch_latency_s=float(options.get("switch_latency_s", 0.0)),
            progress_steps=int(options.get("progress_steps", 10)),
            default_model=default_model,
            catalog=catalog if options.get("use_catalog") else None,
        )

    @property
    def loaded_model(self) -> str | None:
        return self._current

    async def start(self) -> None:
        """Ready at once; "loads" the default model."""
        if self.default_model is not None:
            await self._switch(self.default_model)

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        """Wait the configured latency (interruptible), then return the images."""
        refuse_kind("synthetic", job.type)
        stop = self._stops.setdefault(job.task_id, asyncio.Event())
        try:
            async with self._gpu:
                t0 = time.perf_counter()
                switched = job.model is not None and await self._switch(job.model)
                switch_s = time.perf_counter() - t0 if switched else 0.0
                step = self.latency_s / self.progress_steps
                t1 = time.perf_counter()
                for n in range(self.progress_steps):
                    await self._sleep(step, job.task_id, stop)
                    await progress((n + 1) / self.progress_steps)
                run_s = time.perf_counter() - t1
        finally:
            self._stops.pop(job.task_id, None)
        result = self._result(job)
        result.switch_s, result.run_s = switch_s, run_s
        return result

    async def interrupt(self, task_id: str | None = None) -> None:
        """Make the job of ``task_id`` (every job: None) raise ``Interrupted`` at once."""
        for tid, stop in list(self._stops.items()):
            if task_id is None or tid == task_id:
                stop.set()

    async def aclose(self) -> None:
        await self.interrupt()

    async def _sleep(self, seconds: float, task_id: str, stop: asyncio.Event) -> None:
        if stop.is_set():
            raise Interrupted(f"task {task_id} interrupted")
        try:
            await asyncio.wait_for(stop.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise Interrupted(f"task {task_id} interrupted")

    async def _switch(self, model: str) -> bool:
        name = model
        if self.catalog is not None:
            try:
                name = self.catalog.resolve(model).name
            except Exception as e:
                raise Reject(str(e), code="unknown_model") from e
        if name == self._current:
            return False
        if self.switch_latency_s > 0:
            await asyncio.sleep(self.switch_latency_s)
        self._current = name
        self.switches += 1
        return True

    def _result(self, job: Job) -> RuntimeResult:
        p = job.params
        if job.type in (TaskType.EXTRA_SINGLE_IMAGE, TaskType.EXTRA_BATCH_IMAGES):
            inputs = job.init_images if job.type is TaskType.EXTRA_BATCH_IMAGES else job.init_images[:1]
            images = [synthetic_png(p, n, _scaled(data, p)) for n, data in enumerate(inputs)]
            return RuntimeResult(images=images, info={"runtime": self.name}, model=self._current)
        seed = p.seed if p.seed >= 0 else random.randrange(2**32)
        seeds = variation.consecutive(seed, p.batch_size)
        info = {
            "prompt": p.prompt,
            "negative_prompt": p.negative_prompt,
            "seed": seed,
            "all_seeds": seeds,
            "steps": p.steps,
            "sampler_name": p.sampler or "Euler a",
            "cfg_scale": p.cfg_scale,
            "width": p.width,
            "height": p.height,
            "sd_model_checkpoint": self._current,
            "runtime": self.name,
            "note": "synthetic runtime: images are generated shapes, not diffusion output",
        }
        images = [synthetic_png(p, s) for s in seeds]
        return RuntimeResult(images=images, info=info, seed=seed, model=self._current)
