"""In-process diffusers runtime: SD/SDXL txt2img and img2img, extras upscaling (resizers and
ESRGAN-family models, ``_diffusers_upscale``), an LRU of models bounded by a memory budget.

Inference runs in a worker thread; progress goes back to the event loop once per denoising step and
``interrupt()`` stops the pipeline between steps. Importing this module imports torch and diffusers,
so ``sdfleet.runtimes.build_runtime`` imports it only when the diffusers runtime is asked for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from sdfleet import hires, inpaint, refiner
from sdfleet.errors import Interrupted, ModelLoadError, NotFound, Reject, RuntimeFailure, SdfleetError
from sdfleet.models.catalog import ModelCatalog, ModelInfo
from sdfleet.runtimes import _diffusers_checks as J
from sdfleet.runtimes import _diffusers_generate as G
from sdfleet.runtimes import _diffusers_hires as H
from sdfleet.runtimes import _diffusers_info as R
from sdfleet.runtimes import _diffusers_inpaint as F
from sdfleet.runtimes import _diffusers_lora as L
from sdfleet.runtimes import _diffusers_models as M
from sdfleet.runtimes import _diffusers_opts as O
from sdfleet.runtimes import _diffusers_passes as Q
from sdfleet.runtimes import _diffusers_pipes as P
from sdfleet.runtimes import _diffusers_prompts as E
from sdfleet.runtimes import _diffusers_upscale as U
from sdfleet.runtimes import _extras_plan as X
from sdfleet.runtimes import _pipeline_cache as C
from sdfleet.runtimes import _styles as ST
from sdfleet.runtimes._diffusers_control import RunControl, Stopped, step_callback
from sdfleet.runtimes._diffusers_samplers import sampler_key
from sdfleet.runtimes._lora_loader import LoraLoader
from sdfleet.runtimes._textual_inversion import Embedding, Embeddings, widths_of
from sdfleet.runtimes.base import Job, ProgressFn, RuntimeResult
from sdfleet.runtimes.unsupported import images_made
from sdfleet.tasks import TaskType

log = logging.getLogger(__name__)

T = TypeVar("T")
_EXTRAS = (TaskType.EXTRA_SINGLE_IMAGE, TaskType.EXTRA_BATCH_IMAGES)


class DiffusersRuntime:
    """Runs jobs with diffusers pipelines loaded from a ``ModelCatalog``."""

    name = "diffusers"
    max_in_flight = 2
    """The device runs one job at a time (``_lock``); the second call in flight waits for it, so
    the next job starts the moment one ends while the last one's PNGs are encoded beside it."""

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
        O.check_present(self.device)
        self.max_batch = self.options.max_batch
        self.batch_wait_s = self.options.max_batch_wait_ms / 1000
        self.cache_size = max(1, cache_size)
        budget = C.budget_bytes(self.options.memory_budget_mb, self.device)
        self._cache: C.PipelineCache[M.Loaded] = C.PipelineCache(
            budget=budget, max_count=self.cache_size, release=self._free_memory
        )
        self._current: str | None = None
        self._active: set[RunControl] = set()
        self._infer_lock = threading.Lock()
        self._infer_thread: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self._extras = U.Extras(
            catalog.models_dir,
            self.device,
            self.dtype,
            tile=self.options.upscale_tile,
            max_pixels=self.options.upscale_max_pixels,
        )
        self._loras = LoraLoader(self.options.lora_max_loaded)
        self._embeddings = Embeddings(catalog.models_dir)
        self._styles = ST.Styles(catalog.models_dir)

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

    @property
    def upscalers(self) -> list[str]:
        """Names extras tasks may ask for: None, Lanczos, Nearest and the model upscalers found."""
        return U.upscaler_names(self.catalog.models_dir)

    @property
    def loras(self) -> list[str]:
        """LoRA names prompts may use (``<lora:name:weight>``)."""
        return L.names(self.catalog.models_dir)

    def embeddings(self) -> tuple[list[Embedding], list[Embedding]]:
        """The textual inversion embeddings of the models folder: those made for the loaded
        model's text encoders, and the others (all of them when none is loaded), as SD WebUI
        lists its loaded and skipped ones."""
        found = self._embeddings.all()
        if self._current is None or self._current not in self._cache:
            return [], found
        widths = widths_of(E.text_encoders(self._cache[self._current].pipe))
        return [e for e in found if e.widths == widths], [e for e in found if e.widths != widths]

    async def start(self) -> None:
        """Load the default model, if one is configured. Raises ``ModelLoadError``."""
        if self.default_model is not None:
            async with self._lock:
                await self._switch(self.default_model)

    def batch_key(self, job: Job) -> object | None:
        """Jobs with equal keys may share one pipeline call (``run_batch``)."""
        try:
            sampler = sampler_key(job.params.sampler, job.params.extra.get("scheduler"))
            job = J.styled(self._styles, job)  # a style may bring LoRAs, editing or a negative prompt
        except Reject:
            return None  # it fails alone, with its own reason
        return G.batch_key(job, sampler)

    async def run(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        """Run one job; see ``Runtime.run``."""
        if job.type in _EXTRAS:
            return await self._run_extras(job, progress)
        job = J.styled(self._styles, job)
        sampler = J.check(self.options, self.catalog.models_dir, job)
        (outcome,) = await self._generate_jobs([job], [progress], sampler)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def run_batch(
        self, jobs: Sequence[Job], progress: Sequence[ProgressFn]
    ) -> list[RuntimeResult | BaseException]:
        """Compatible jobs (equal ``batch_key``) in one pipeline call; one outcome per job. A job that
        is invalid or interrupted fails alone; when the call itself fails, each job runs alone."""
        outcomes: list[RuntimeResult | BaseException] = []
        valid: list[int] = []
        sampler: str | None = None
        styled = list(jobs)  # run alone below, a job is given as it came: styled once, there
        for i, job in enumerate(jobs):
            try:
                styled[i] = J.styled(self._styles, job)
                sampler = J.check(self.options, self.catalog.models_dir, styled[i])
            except Reject as e:
                outcomes.append(e)
            else:
                outcomes.append(Interrupted(f"task {job.task_id} interrupted"))
                valid.append(i)
        if not valid:
            return outcomes
        try:
            results = await self._generate_jobs(
                [styled[i] for i in valid], [progress[i] for i in valid], sampler
            )
        except (RuntimeFailure, Reject) as e:
            if len(valid) == 1 or isinstance(e, Interrupted):  # every job of it was interrupted
                for i in valid:
                    outcomes[i] = e
                return outcomes
            log.warning("a batch of %d failed (%s): running its tasks alone", len(valid), e)
            results = [await _outcome(self.run(jobs[i], progress[i])) for i in valid]
        for i, result in zip(valid, results, strict=True):
            outcomes[i] = result
        return outcomes

    async def _generate_jobs(
        self, jobs: Sequence[Job], progress: Sequence[ProgressFn], sampler: str | None
    ) -> list[RuntimeResult | BaseException]:
        async def fan_out(value: float) -> None:
            for report in progress:
                await report(value)

        ctl = RunControl(fan_out, [job.task_id for job in jobs])
        self._active.add(ctl)
        name = ""
        hashing: list[asyncio.Task[str | None]] = []
        try:
            # masks' image work (seconds for a large mask blurred far): before the device is
            # waited for, each job's in a thread of its own
            ready = list(await asyncio.gather(*(asyncio.to_thread(F.prepare, job) for job in jobs)))
            async with self._lock:
                t0 = time.perf_counter()
                loaded, switched, download_s = await self._switch(jobs[0].model)
                hr, refining = await M.companions(jobs[0], loaded, self._models)
                download_s += hr.download_s + refining.download_s
                loaded_now = switched or hr.loaded_now or refining.loaded_now
                switch_s = time.perf_counter() - t0 - download_s if loaded_now else 0.0
                name = loaded.info.name
                # Read beside the run, not after it: the first time, seconds for a multi-GB file.
                models = [loaded.info, hr.info, refining.info]
                hashing = [asyncio.create_task(asyncio.to_thread(R.model_hash, m)) for m in models if m]
                work = partial(self._generate, loaded, jobs, sampler, ctl, ready, hr.loaded, refining.loaded)
                t1 = time.perf_counter()
                try:
                    generated = await self._in_thread(ctl, work, self._inference_thread())
                finally:
                    if hr.transient or refining.transient:  # held for this job alone: freed now
                        del work
                        hr.loaded = refining.loaded = None
                        self._free_memory()
                run_s = time.perf_counter() - t1
            M.titles(generated, [await each for each in hashing], hr.info, refining.info)
            results = await asyncio.to_thread(G.encode, generated)
        except Reject as e:
            if e.code != "out_of_memory" or not self._evict_all_but(name):
                raise
            # Other cached pipelines held memory and are gone now: a retry may fit.
            raise RuntimeFailure(f"{e.reason}; unloaded other cached models", code=e.code) from e
        finally:
            for each in hashing:  # those not done: the run failed, their threads finish alone,
                each.cancel()  # and what they read is remembered for the next
            self._active.discard(ctl)
            await ctl.close()
        outcomes: list[RuntimeResult | BaseException] = []
        for job, result in zip(jobs, results, strict=True):
            if job.task_id in ctl.stopped:
                outcomes.append(Interrupted(f"task {job.task_id} interrupted"))
                continue
            result.switch_s, result.run_s, result.download_s = switch_s, run_s, download_s
            result.info["batch_tasks"] = len(jobs)  # tasks that shared this pipeline call
            outcomes.append(result)
        return outcomes

    async def interrupt(self, task_id: str | None = None) -> None:
        """Stop the job of ``task_id`` (None: every job) between two steps; its ``run`` raises
        ``Interrupted``. A batch stops once every job of it is interrupted; until then the others'
        images are made and the interrupted job's are dropped."""
        for ctl in list(self._active):
            ctl.interrupt(task_id)

    async def unload(self) -> None:
        """Drop every loaded pipeline and free its memory (SD WebUI's ``unload-checkpoint``); the
        next job loads its model again."""
        async with self._lock:
            self._drop_pipelines()

    def _drop_pipelines(self, *, collect: bool = True) -> None:
        """Forget the current model and every cached pipeline (and so free their memory); the
        caller holds ``_lock``."""
        self._current = None
        self._cache.clear(release=collect)

    async def aclose(self) -> None:
        await self.interrupt()
        async with self._lock:
            # No garbage collection: the process is ending (a full collection of an agent's heap
            # takes about 0.4 s), and a runtime used again collects at its next eviction.
            self._drop_pipelines(collect=False)
            self._extras.models.clear()
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
        self, ctl: RunControl, work: Callable[[], T], executor: ThreadPoolExecutor | None
    ) -> T:
        try:
            result = await asyncio.get_running_loop().run_in_executor(executor, work)
        except asyncio.CancelledError:
            ctl.stop.set()  # the thread cannot be cancelled: make it stop at the next step
            raise
        await ctl.close()
        await ctl.final()
        return result

    async def _switch(self, model: str | None) -> tuple[M.Loaded, bool, float]:
        """The model's pipeline, loaded or activated; whether that changed the active model; and the
        seconds spent fetching it onto disk first (``models.s3``)."""
        name = model or self._current or self.default_model
        if name is None:
            raise Reject("the job names no model and none is loaded", code="no_model")
        info, download_s = await self._fetch(name)
        loaded = self._cache.get(info.name)
        await M.refuse_sdxl_refiner(info, loaded)
        if loaded is None:
            estimate = await asyncio.to_thread(C.estimate_footprint, info, self.dtype)
            self._cache.make_room(info.name, estimate)
            if self._current not in self._cache:
                self._current = None  # evicted: if the load fails, nothing is loaded
            loaded = await asyncio.to_thread(self._load, info)
            self._cache.put(info.name, loaded, loaded.footprint)
        switched = self._current != info.name
        self._current = info.name
        return loaded, switched, download_s

    @property
    def _models(self) -> M.Models:
        return M.Models(self._cache, self._fetch, self._load, self.dtype)

    async def _fetch(self, name: str, field: str = "") -> tuple[ModelInfo, float]:
        """``catalog.fetch``, its errors as a job's (``field``: what named the model)."""
        try:
            return await self.catalog.fetch(name)
        except NotFound as e:
            raise Reject(f"{field}{e.message}", code="unknown_model") from e
        except SdfleetError as e:  # S3 unreachable, denied, disk full: another attempt may work
            raise ModelLoadError(f"cannot fetch model {name!r}: {e.message}", code=e.code) from e

    def _load(self, info: ModelInfo) -> M.Loaded:
        started = time.perf_counter()
        pipe = P.load_pipeline(info, self.device, self.dtype)
        O.apply_options(pipe, self.options, self.device)
        took = time.perf_counter() - started
        footprint = C.measure_footprint(pipe)
        what = f"{info.kind}, {C.mib(footprint)}"
        log.info("loaded model %s (%s) on %s in %.2fs", info.name, what, self.device, took)
        return M.Loaded(info, pipe, pipe.scheduler, took, footprint)

    def _free_memory(self) -> None:
        O.release_memory(self.device)

    def _evict_all_but(self, keep: str) -> bool:
        return self._cache.evict_all_but(keep, f"{keep} ran out of memory")

    def _generate(
        self,
        loaded: M.Loaded,
        jobs: Sequence[Job],
        sampler: str | None,
        ctl: RunControl,
        ready: Sequence[F.Inpainting | None] | None = None,
        hr: M.Loaded | None = None,
        refining: M.Loaded | None = None,
    ) -> G.Generated:
        names = ", ".join(job.task_id for job in jobs)
        with self._infer_lock:
            if ctl.stop.is_set():
                raise Interrupted(f"task {names} interrupted before it started")
            try:
                pipe = self._pipe_for(loaded, jobs[0])
                pipe.scheduler = M.scheduler(sampler, loaded.base_scheduler, jobs[0].params)
                skip = self.options.missing_lora == "skip"
                loras = L.resolve(jobs[0], self.catalog.models_dir, skip_missing=skip)
                tiling = G.tiling(jobs[0].params)
                for model in (each for each in (loaded, hr, refining) if each is not None):
                    self._loras.apply(model.pipe, loras)  # the first pass's, in every model
                    P.set_tiling(model.pipe, tiling, vae_tiling=self.options.vae_tiling)
                second = self._second_pass(loaded, jobs[0], hr)
                wanted = refiner.read(jobs[0].params)
                refine = Q.Refine(refining.pipe, wanted) if refining is not None and wanted else None
                progress = partial(step_callback, ctl)
                generated = G.generate(
                    pipe, jobs, sampler, loaded.info, progress, second, self._embeddings, ready, refine
                )
                generated.loras = loras
                return generated
            except Stopped as e:
                raise Interrupted(f"task {names} interrupted") from e
            except (SdfleetError, Reject):
                raise
            except Exception as e:
                if not O.is_out_of_memory(e):
                    raise RuntimeFailure(f"diffusers failed on task {names}: {e}") from e
                oom = e
            # Outside the except block, so that the failed run's frames can be let go of.
            log.warning("task %s ran out of memory on %s: %s", names, self.device, oom)
            O.release_memory(self.device, oom)
            images = sum(images_made(job.type, job.params, len(job.init_images)) for job in jobs)
            params = jobs[0].params.model_copy(update={"batch_size": images})
            raise O.out_of_memory(params, self.device, jobs[0].type is TaskType.IMAGE_TO_IMAGE) from oom

    @staticmethod
    def _pipe_for(loaded: M.Loaded, job: Job) -> Any:
        if inpaint.asked(job.type, job.params) or P.inpainting_unet(loaded.pipe):
            return loaded.inpaint()  # masked jobs share a call only with masked ones (batch_key)
        return loaded.img2img() if job.type is TaskType.IMAGE_TO_IMAGE else loaded.pipe

    def _second_pass(self, loaded: M.Loaded, job: Job, hr: M.Loaded | None = None) -> H.SecondPass | None:
        """A hires fix's image-to-image pass over the loaded model (``hr``: another one), with its
        own sampler."""
        plan = hires.plan(job.type, job.params)
        if plan is None:
            return None
        model = hr or loaded
        # on an inpainting checkpoint an inpainting pipeline, another than the first pass's: each
        # pass has its own sampler
        pipe, sampler = model.img2img(), sampler_key(*hires.sampler_of(plan, job.params))
        pipe.scheduler = M.scheduler(sampler, model.base_scheduler, job.params)
        return H.SecondPass(pipe, plan, self._extras.upscale_to, sampler, other_model=hr is not None)

    async def _run_extras(self, job: Job, progress: ProgressFn) -> RuntimeResult:
        plan = X.plan(job, self.catalog.models_dir)  # bad names fail before waiting for the device
        ctl = RunControl(progress, [job.task_id])
        self._active.add(ctl)
        work = partial(self._extras.run, job, plan, ctl.stop.is_set, ctl.report)
        try:
            if not plan.on_device:  # resizes only: no device needed
                result = await self._in_thread(ctl, work, None)
            else:
                async with self._lock:
                    result = await self._in_thread(
                        ctl, partial(self._on_device, work), self._inference_thread()
                    )
        finally:
            self._active.discard(ctl)
            await ctl.close()
        result.model = self._current
        return result

    def _on_device(self, work: Callable[[], T]) -> T:
        with self._infer_lock:
            try:
                return work()
            except (SdfleetError, Reject):
                raise
            except Exception as e:
                if O.is_out_of_memory(e):
                    O.release_memory(self.device, e)
                    raise Reject(
                        f"out of memory on {self.device} while upscaling; lower upscale_tile",
                        code="out_of_memory",
                    ) from None
                raise RuntimeFailure(f"upscaler failed: {e}") from e


async def _outcome(run: Awaitable[RuntimeResult]) -> RuntimeResult | BaseException:
    try:
        return await run
    except Exception as e:
        return e
