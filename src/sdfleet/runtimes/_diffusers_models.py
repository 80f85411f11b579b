"""The diffusers runtime's models (imports torch): a loaded pipeline and the pipelines made of it
(``Loaded``); the models a job needs beside its own, the hires pass's and the refiner
(``Companion``, ``load_beside``); and what a job's schedulers and infotext titles are made of.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sdfleet import hires, refiner
from sdfleet.errors import Reject
from sdfleet.models.catalog import ModelInfo
from sdfleet.models.unet_shape import sdxl_refiner, unet_config
from sdfleet.runtimes import _diffusers_ancestral as A
from sdfleet.runtimes import _diffusers_churn as K
from sdfleet.runtimes import _diffusers_generate as G
from sdfleet.runtimes import _diffusers_info as R
from sdfleet.runtimes import _diffusers_pipes as P
from sdfleet.runtimes import _diffusers_refiner as RF
from sdfleet.runtimes import _pipeline_cache as C
from sdfleet.runtimes.base import Job
from sdfleet.tasks import TaskParams

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A model's pipeline, its own scheduler, and the image-to-image and inpainting pipelines
    made of it when first asked for (sharing its components)."""

    info: ModelInfo
    pipe: Any
    base_scheduler: Any
    load_s: float
    footprint: int
    _img2img: Any = field(default=None, repr=False)
    _inpaint: Any = field(default=None, repr=False)

    def img2img(self) -> Any:
        if self._img2img is None:
            self._img2img = P.img2img_from(self.pipe)
        return self._img2img

    def inpaint(self) -> Any:
        if self._inpaint is None:
            self._inpaint = P.inpaint_from(self.pipe)
        return self._inpaint


@dataclass
class Companion:
    """A model a task needs beside its own: the hires pass's (``hr_checkpoint_name``) or the
    refiner (``refiner_checkpoint``)."""

    info: ModelInfo | None = None
    """None: the task asks for none."""
    loaded: Loaded | None = None
    """Its pipeline, where it is not the task's own model."""
    loaded_now: bool = False
    transient: bool = False
    """Loaded for this job alone: the cache had no room for it beside the task's models."""
    download_s: float = 0.0


async def load_beside(
    cache: C.PipelineCache[Loaded],
    load: Callable[[ModelInfo], Loaded],
    info: ModelInfo,
    beside: list[Loaded],
    dtype: torch.dtype,
    whose: str,
) -> Companion:
    """``info``'s pipeline from ``cache``, else loaded (by ``load``, in a thread) beside the
    models of ``beside``, which stay; where the cache has no room for them all, held for this job
    alone (``whose``: the task and the field that named it, for the warning), not cached."""
    found = Companion(info, cache.get(info.name))
    if found.loaded is not None:
        return found
    keep = [each.info.name for each in beside]
    estimate = await asyncio.to_thread(C.estimate_footprint, info, dtype)
    fits = cache.make_room_beside(keep, info.name, estimate)
    found.loaded, found.loaded_now = await asyncio.to_thread(load, info), True
    if fits:
        cache.put(info.name, found.loaded, found.loaded.footprint, keep=keep)
        return found
    found.transient = True
    log.warning(
        "no room for %s beside %s in the pipeline cache (cache_size %d, memory budget %s): "
        "loaded for %s alone",
        info.name,
        ", ".join(keep),
        cache.max_count,
        C.mib(cache.budget),
        whose,
    )
    return found


@dataclass(frozen=True)
class Models:
    """The runtime's means to models: its cache, how it finds a model (``fetch``: the model's
    info and the seconds spent fetching it, its errors as a job's) and loads one, its dtype."""

    cache: C.PipelineCache[Loaded]
    fetch: Callable[[str, str], Awaitable[tuple[ModelInfo, float]]]
    load: Callable[[ModelInfo], Loaded]
    dtype: torch.dtype


async def companions(job: Job, first: Loaded, models: Models) -> tuple[Companion, Companion]:
    """The models a job needs beside its own (``first``, which stays the current model): the
    hires pass's and the refiner; each loaded beside the others. Where the cache has no room
    for them all, one is loaded for this job alone and let go after it; they are in memory
    together while it runs (SD WebUI swaps one's weights for the other's mid-job instead)."""
    plan = hires.plan(job.type, job.params)
    wanted = refiner.read(job.params)
    hr = await _companion(job, plan.checkpoint if plan else None, "hr_checkpoint_name", [first], models)
    beside = [first] if hr.loaded is None or hr.transient else [first, hr.loaded]
    named = wanted.checkpoint if wanted else None
    refining = await _companion(job, named, "refiner_checkpoint", beside, models, shaped=True)
    if refining.loaded is not None and (why := RF.compatible(first.pipe, refining.loaded.pipe)):
        raise Reject(f"refiner_checkpoint {refining.loaded.info.name}: {why}", code="invalid_params")
    return hr, refining


async def _companion(
    job: Job, name: str | None, field: str, beside: list[Loaded], models: Models, *, shaped: bool = False
) -> Companion:
    """The model ``field`` names, loaded beside ``beside``; ``shaped``: it must have the shape of
    ``beside[0]``, the job's model (a refiner's: ``refuse_unlike``, before it costs a load)."""
    if name is None:
        return Companion()
    info, download_s = await models.fetch(name, f"{field}: ")
    if info.name == beside[0].info.name:  # the job's own model: nothing to load
        return Companion(info, download_s=download_s)
    if shaped:
        await asyncio.to_thread(refuse_unlike, beside[0], info, field)
    found = await load_beside(
        models.cache, models.load, info, beside, models.dtype, f"task {job.task_id}'s {field}"
    )
    found.download_s = download_s
    return found


async def refuse_sdxl_refiner(info: ModelInfo, loaded: Loaded | None) -> None:
    """``Reject`` (``invalid_params``) for SDXL's refiner named as a task's model (its UNet takes
    time ids no text-to-image call makes): by its loaded pipeline (it refined another task), else
    by its files, before it is loaded (``unet_shape.sdxl_refiner``)."""
    if loaded is not None:
        refiner = RF.time_ids(loaded.pipe) == 5
    else:
        refiner = await asyncio.to_thread(sdxl_refiner, info)
    if refiner:
        raise Reject(
            f"{info.name} is SDXL's refiner: it refines an SDXL model's task as its "
            "refiner_checkpoint, and runs no task as its model",
            code="invalid_params",
        )


def refuse_unlike(like: Loaded, info: ModelInfo, field: str) -> None:
    """``Reject`` (``invalid_params``) for a refiner (``info``, named by ``field``) whose UNet,
    read before it is loaded (``unet_shape``), cannot take over from ``like``'s
    (``_diffusers_refiner.unlike``); where it cannot be read so, the loaded one is checked."""
    shape = unet_config(info)
    if shape is not None and (why := RF.unlike(like.pipe.unet.config, shape, loaded=False)):
        raise Reject(f"{field} {info.name}: {why}", code="invalid_params")


def scheduler(sampler: str | None, base: Any, params: TaskParams) -> Any:
    """A fresh scheduler for ``sampler`` (the model's own kind without one), at the task's ``eta``
    (Euler a) or churn (Euler)."""
    made = A.with_eta(P.scheduler_for(sampler, base), G.eta(params))
    return K.with_churn(made, K.read(params))


def titles(
    generated: G.Generated, hashes: list[str | None], hr: ModelInfo | None, refining: ModelInfo | None
) -> None:
    """The model's hash, and the hires pass's model's and the refiner's short titles, into
    ``generated`` (``hashes`` in that order, of those there are)."""
    read = iter(hashes)
    generated.model_hash = next(read)
    if hr is not None:
        generated.hires_checkpoint = R.short_title(hr, next(read))
    if refining is not None:
        title = R.short_title(refining, next(read))
        generated.refiner = title if any(generated.refined) else None
