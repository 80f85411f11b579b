"""A diffusers job made ready before the device is waited for: its prompt styles merged into its
prompts, and what the runtime can never run refused (``Reject``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sdfleet import hires, inpaint, refiner
from sdfleet.errors import Reject
from sdfleet.runtimes import _diffusers_lora as L
from sdfleet.runtimes import _diffusers_opts as O
from sdfleet.runtimes import _diffusers_upscale as U
from sdfleet.runtimes import _styles as ST
from sdfleet.runtimes._diffusers_samplers import sampler_key
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.unsupported import refuse, refuse_too_many_inputs
from sdfleet.tasks import GENERATE, TaskType


def styled(styles: ST.Styles, job: Job) -> Job:
    """The job with its prompt styles (``styles``) merged into its prompts."""
    params = ST.apply(job.params, styles.all()) if job.type in GENERATE else job.params
    return job if params is job.params else dataclasses.replace(job, params=params)


def check(options: O.DiffusersOptions, models_dir: Path, job: Job) -> str | None:
    """The job's sampler; ``Reject`` for what the runtime can never run: what the API refuses
    at the door of a diffusers queue (a task no API saw comes here unchecked), then what
    depends on the runtime's ``options`` and models folder."""
    refuse("diffusers", job.type, job.params)  # a pipeline task: the runtime runs extras elsewhere
    O.check_size(job.params, job.type, options.generate_max_pixels)
    if job.type is TaskType.IMAGE_TO_IMAGE and not job.init_images:
        raise Reject("image-to-image needs an init image", code="invalid_params")
    if job.type is TaskType.IMAGE_TO_IMAGE:
        refuse_too_many_inputs(len(job.init_images), job.params.batch_size)
    if inpaint.asked(job.type, job.params) and job.mask is None:
        raise Reject("inpainting needs the mask image, which was not fetched", code="invalid_params")
    refiner.read(job.params)
    second = hires.plan(job.type, job.params)
    if second is not None:  # its sampler and upscaler exist, before the device is waited for
        sampler_key(*hires.sampler_of(second, job.params))
        if second.latent_mode is None:
            U.resolve(second.upscaler, models_dir)
    if options.missing_lora == "fail":
        L.resolve(job, models_dir)
    else:
        L.uses(job, lenient=True)  # bad weights are still refused; what is missing is told at run time
    return sampler_key(job.params.sampler, job.params.extra.get("scheduler"))
