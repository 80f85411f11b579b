"""In-process diffusers runtime: SD/SDXL txt2img and img2img, Lanczos/Nearest extras, an LRU of
models bounded by a memory budget.

Inference runs in a worker thread; progress goes back to the event loop once per denoising step and
``interrupt()`` stops the pipeline between steps. Importing this module imports torch and diffusers,
so ``sdfleet.runtimes.build_runtime`` imports it only when the diffusers runtime is asked for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from sdfleet.errors import Interrupted, NotFound, Reject, RuntimeFailure, SdfleetError
from sdfleet.models.catalog import ModelCatalog, ModelInfo
from sdfleet.runtimes import _diffusers_opts as O
from sdfleet.runtimes import _diffusers_pipes as P
from sdfleet.runtimes import _pipeline_cache as C
from sdfleet.runtimes._diffusers_control import RunControl, Stopped, step_callback
from sdfleet.runtimes.base import Job, ProgressFn, RuntimeResult
from sdfleet.tasks import TaskType

log = logging.getLogger(__name__)

_EXTRAS = (TaskType.EXTRA_SINGLE_IMAGE, TaskType.EXTRA_BATCH_IMAGES)
_GENERATE = (TaskType.TEXT_TO_IMAGE, TaskType.IMAGE_TO_IMAGE)


@dataclass
class _Loaded:
    info: ModelInfo
    pipe: Any
    base_scheduler: Any
    load_s: float
    footprint: int
    _img2img: Any = field(default=None, repr=False)

    def img2img(self) -> Any:
        if self._img2img is None:
            self._img2img = P.img2img_from(self.pipe)
        return self._img2img


class DiffusersRuntime:
    """Runs jobs with diffusers pipelines loaded from a ``ModelCatalog``."""

    name = "diffusers"
    max_in_flight = 1

    def __init__(
        self,
        catalog: ModelCatalog,
        *,
        default_model: str | None = None,
        device: str | None = None,
        cache_size: int = 2,
        options: O.DiffusersOptions | None = None,
    ) -> None:
        """``device``, when given, overrides ``options.device``."""
        opts = options or O.DiffusersOptions()
        self.options = opts if device is None else dataclasses.replace(opts, device=device)
        self.catalog = catalog
        self.default_model = default_model
        self.device, self.dtype = self.options.resolve_device()
        self.cache_size = max(1, cache_size)
        budget = C.budget_bytes(self.options.memory_budget_mb, self.device)
        self._cache: C.PipelineCache[_Loaded] = C.PipelineCache(
            budget=budget, max_count=self.cache_size, release=self._free_memory
        )
        self._current: str | None = None
        self._active: set[RunControl] = set()
        self._infer_lock = threading.Lock()
        self._infer_thread: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_options(
        cls,
        *,
        catalog: ModelCatalog,
        options: Mapping[str, Any],
        default_model: str | None = None,
        cache_size: int = 2,
    ) -> DiffusersRuntime:
        """Raises ``ValueError`` for an unknown option or value (``build_runtime``: ``ConfigError``)."""
        opts = O.DiffusersOptions.parse(options)
        return cls(catalog, default_model=default_model, cache_size=cache_size, options=opts)

    @property
    def loaded_model(self) -> str | None:
        return self._current

    @property
    def cached_models(self) -> list[str]:
        """Loaded pipelines, least recently used first."""
        return list(self._cache)

    @property
    def cached_footprints(self) -> dict[str, int]:
        """Loaded pipelines → bytes of their weights, least recently used first."""
        return self._cache.footprints()

    @property
    def memory_budget(self) -> int:
        """Bytes the cached pipelines' weights may take (``memory_budget_mb`` or its default)."""
        return self._cache.budget

    async def start(self) -> None:
        """Load the default model, if one is configured. Raises ``ModelLoadError``."""
        if self.default_model is not None:
            async with self._lock:
                await self._switch(self.default_model)

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        """Run one job; see ``Runtime.run``."""
        ctl = RunControl(progress, job.task_id)
        self._active.add(ctl)
        try:
            return await self._run(job, ctl)
        finally:
            self._active.discard(ctl)
            await ctl.close()

    async def _run(self, job: Job, ctl: RunControl) -> RuntimeResult:
        if job.type in _EXTRAS:
            return await self._in_thread(ctl, lambda: self._extras(job, ctl), None)
        if job.type not in _GENERATE:
            raise Reject(
                f"the diffusers runtime cannot run {job.type.value!r} tasks", code="unsupported_task"
            )
        sampler = P.sampler_key(job.params.sampler, job.params.extra.get("scheduler"))
        if job.type is TaskType.IMAGE_TO_IMAGE and not job.init_images:
            raise Reject("image-to-image needs an init image", code="invalid_params")
        async with self._lock:
            t0 = time.perf_counter()
            loaded = await self._switch(job.model)
            switch_s = time.perf_counter() - t0
            try:
                work = partial(self._generate, loaded, job, sampler, ctl)
                result = await self._in_thread(ctl, work, self._inference_thread())
                result.switch_s = switch_s
                return result
            except Reject as e:
                if e.code != "out_of_memory" or not self._evict_all_but(loaded.info.name):
                    raise
                # Other cached pipelines held memory and are gone now: a retry may fit.
                raise RuntimeFailure(f"{e.reason}; unloaded other cached models", code=e.code) from e

    async def interrupt(self, task_id: str | None = None) -> None:
        """Stop the job of ``task_id`` (None: every job) between two steps; its ``run`` raises
        ``Interrupted``."""
        for ctl in list(self._active):
            if task_id is None or ctl.task_id == task_id:
                ctl.stop.set()

    async def aclose(self) -> None:
        await self.interrupt()
        async with self._lock:
            self._current = None
            self._cache.clear()  # and frees the memory
            if self._infer_thread is not None:
                self._infer_thread.shutdown(wait=False)
                self._infer_thread = None

    def _inference_thread(self) -> ThreadPoolExecutor:
        # Every generation runs on this one thread: torch.compile's CUDA graphs (reduce-overhead)
        # are recorded per thread, and a pool's changing threads would re-record them.
        if self._infer_thread is None:
            self._infer_thread = ThreadPoolExecutor(1, thread_name_prefix="sdfleet-diffusers")
        return self._infer_thread

    async def _in_thread(
        self, ctl: RunControl, work: Callable[[], RuntimeResult], executor: ThreadPoolExecutor | None
    ) -> RuntimeResult:
        try:
            result = await asyncio.get_running_loop().run_in_executor(executor, work)
        except asyncio.CancelledError:
            ctl.stop.set()  # the thread cannot be cancelled: make it stop at the next step
            raise
        await ctl.close()
        await ctl.final()
        return result

    async def _switch(self, model: str | None) -> _Loaded:
        name = model or self._current or self.default_model
        if name is None:
            raise Reject("the job names no model and none is loaded", code="no_model")
        try:
            info = self.catalog.resolve(name)
        except NotFound as e:
            raise Reject(e.message, code="unknown_model") from e
        loaded = self._cache.get(info.name)
        if loaded is None:
            estimate = await asyncio.to_thread(C.estimate_footprint, info, self.dtype)
            self._cache.make_room(info.name, estimate)
            if self._current not in self._cache:
                self._current = None  # evicted: if the load fails, nothing is loaded
            loaded = await asyncio.to_thread(self._load, info)
            self._cache.put(info.name, loaded, loaded.footprint)
        self._current = info.name
        return loaded

    def _load(self, info: ModelInfo) -> _Loaded:
        started = time.perf_counter()
        pipe = P.load_pipeline(info, self.device, self.dtype)
        O.apply_options(pipe, self.options, self.device)
        took = time.perf_counter() - started
        footprint = C.measure_footprint(pipe)
        what = f"{info.kind}, {C.mib(footprint)}"
        log.info("loaded model %s (%s) on %s in %.2fs", info.name, what, self.device, took)
        return _Loaded(info, pipe, pipe.scheduler, took, footprint)

    def _free_memory(self) -> None:
        O.release_memory(self.device)

    def _evict_all_but(self, keep: str) -> bool:
        return self._cache.evict_all_but(keep, f"{keep} ran out of memory")

    def _generate(self, loaded: _Loaded, job: Job, sampler: str | None, ctl: RunControl) -> RuntimeResult:
        with self._infer_lock:
            if ctl.stop.is_set():
                raise Interrupted(f"task {job.task_id} interrupted before it started")
            try:
                return self._generate_locked(loaded, job, sampler, ctl)
            except Stopped as e:
                raise Interrupted(f"task {job.task_id} interrupted") from e
            except (SdfleetError, Reject):
                raise
            except Exception as e:
                if not O.is_out_of_memory(e):
                    raise RuntimeFailure(f"diffusers failed on task {job.task_id}: {e}") from e
                oom = e
            # Outside the except block, so that the failed run's frames can be let go of.
            log.warning("task %s ran out of memory on %s: %s", job.task_id, self.device, oom)
            O.release_memory(self.device, oom)
            raise O.out_of_memory(job.params, self.device, job.type is TaskType.IMAGE_TO_IMAGE) from oom

    def _generate_locked(
        self, loaded: _Loaded, job: Job, sampler: str | None, ctl: RunControl
    ) -> RuntimeResult:
        p = job.params
        base = loaded.base_scheduler
        img2img = job.type is TaskType.IMAGE_TO_IMAGE
        pipe = loaded.img2img() if img2img else loaded.pipe
        pipe.scheduler = (
            P.make_scheduler(sampler, base.config) if sampler else type(base).from_config(base.config)
        )
        seed = p.seed if p.seed >= 0 else random.randrange(2**32)
        seeds = [(seed + i) % 2**32 for i in range(p.batch_size)]
        steps = p.steps
        kwargs: dict[str, Any] = {
            "prompt": p.prompt,
            "negative_prompt": p.negative_prompt or None,
            "guidance_scale": p.cfg_scale,
            "num_images_per_prompt": p.batch_size,
            "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
            "callback_on_step_end": step_callback(ctl),
            "output_type": "pil",
        }
        if p.clip_skip > 1:
            kwargs["clip_skip"] = p.clip_skip - 1  # A1111 counts the last layer as 1, diffusers as 0
        if img2img:
            steps = P.img2img_steps(p.steps, p.denoising_strength)
            kwargs["image"] = P.decode_image(job.init_images[0], (p.width, p.height))
            kwargs["strength"] = p.denoising_strength
        else:
            kwargs.update(width=p.width, height=p.height)
        with torch.inference_mode():
            images = pipe(num_inference_steps=steps, **kwargs).images
        sampler_name = sampler or P.sampler_name_of(pipe.scheduler)
        info = P.build_info(p, seeds, sampler_name, loaded.info, steps)
        pngs = [P.to_png(img, text) for img, text in zip(images, info["infotexts"], strict=True)]
        return RuntimeResult(images=pngs, info=info, seed=seed, model=loaded.info.name)

    def _extras(self, job: Job, ctl: RunControl) -> RuntimeResult:
        inputs = job.init_images if job.type is TaskType.EXTRA_BATCH_IMAGES else job.init_images[:1]
        if not inputs:
            raise Reject(f"{job.type.value} needs at least one input image", code="invalid_params")
        out: list[bytes] = []
        for n, data in enumerate(inputs):
            if ctl.stop.is_set():
                raise Interrupted(f"task {job.task_id} interrupted")
            out.append(P.upscale(data, job.params.upscaling_resize, job.params.upscaler))
            ctl.report(min(0.99, (n + 1) / len(inputs)))
        info = {"upscaler": job.params.upscaler or "Lanczos", "upscaling_resize": job.params.upscaling_resize}
        return RuntimeResult(images=out, info=info, model=self._current)
