"""Options of the diffusers runtime (device, dtype, attention, channels-last, compile, VAE tiling),
its generation size bound and its out-of-memory handling. Imports torch."""

from __future__ import annotations

import gc
import logging
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from sdfleet import hires, variation
from sdfleet.errors import Reject
from sdfleet.tasks import TaskParams, TaskType

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ATTENTION = ("sdpa", "classic")
MISSING_LORA = ("fail", "skip")
_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory")


@dataclass(frozen=True)
class DiffusersOptions:
    """``runtimes.diffusers`` in the fleet file."""

    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str | None = None
    """``fp16``, ``bf16`` or ``fp32``; default fp16 on CUDA, fp32 on CPU."""
    attention: str = "sdpa"
    """``sdpa`` (torch scaled-dot-product attention, ``AttnProcessor2_0``) or ``classic``."""
    channels_last: bool | None = None
    """UNet weights in channels-last memory format; default on for CUDA, off for CPU."""
    compile: bool = False
    """``torch.compile(unet, mode="reduce-overhead")`` on CUDA (skipped, with a log line, on CPU)."""
    vae_tiling: bool = False
    """Decode latents tile by tile: large images in less memory, a little slower."""
    max_batch: int = 1
    """Dynamic batching: most images one pipeline call makes for compatible tasks (same model,
    type, size, steps, sampler, CFG scale, strength, clip skip); 1: every task alone."""
    max_batch_wait_ms: float = 50.0
    """Longest a task waits for batch-mates once the GPU could take it, milliseconds."""
    memory_budget_mb: float | None = None
    """MiB the cached pipelines' weights may take; default: on CUDA 85 % of the GPU's total memory
    minus max(2 GiB, 10 %) for activations, on CPU half the available RAM (``_pipeline_cache``)."""
    lora_max_loaded: int = 4
    """LoRA adapters kept loaded per model (least recently used unloaded first); a task without
    LoRA runs with all of them disabled."""
    missing_lora: str = "fail"
    """A prompt's LoRA that the models folder lacks: ``fail`` the task (``unknown_lora``, with
    the list of available ones) or ``skip`` it and run without it, as SD WebUI 1.10 does
    (logged; ``sdfleet runtime serve``'s default)."""
    upscale_tile: int = 192
    """Model upscalers run on tiles of this many pixels square (SD WebUI's ``ESRGAN_tile``); 0: the
    whole image at once (fastest, most memory)."""
    generate_max_pixels: int = 2048 * 2048
    """Largest image (width × height) a text-to-image or image-to-image task may make; a larger one
    fails the task (``too_large``, not retried) before it runs. Agents built from a fleet file
    default it to ``api.max_width`` × ``api.max_height`` (``build.runtime_options``), so what the
    API admits always runs and a message published past the API is held to the same bound."""
    upscale_max_pixels: int = 4096 * 4096
    """Largest image (width × height) an extras task may read or make, intermediate model passes
    included; a larger one fails the task (``too_large``) before any memory is spent on it."""

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> DiffusersOptions:
        """Options from a mapping; raises ``ValueError`` for an unknown key or value."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown diffusers option(s) {unknown}; known: {sorted(known)}")
        opts = cls(**{k: v for k, v in options.items() if k in known})
        if opts.dtype is not None and opts.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {opts.dtype!r}")
        if opts.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {list(ATTENTION)}, not {opts.attention!r}")
        if opts.missing_lora not in MISSING_LORA:
            raise ValueError(f"missing_lora must be one of {list(MISSING_LORA)}, not {opts.missing_lora!r}")
        for flag in ("channels_last", "compile", "vae_tiling"):
            value = getattr(opts, flag)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{flag} must be true or false, not {value!r}")
        _check_budget(opts.memory_budget_mb)
        if isinstance(opts.max_batch, bool) or not isinstance(opts.max_batch, int) or opts.max_batch < 1:
            raise ValueError(f"max_batch must be an integer of at least 1, not {opts.max_batch!r}")
        _check_int("lora_max_loaded", opts.lora_max_loaded, 1)
        _check_int("upscale_tile", opts.upscale_tile, 0)
        _check_int("generate_max_pixels", opts.generate_max_pixels, 64)
        _check_int("upscale_max_pixels", opts.upscale_max_pixels, 1)
        wait = opts.max_batch_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0:
            raise ValueError(f"max_batch_wait_ms must be a number of at least 0, not {wait!r}")
        return opts

    def resolve_device(self) -> tuple[str, torch.dtype]:
        """(device, dtype); ``ValueError`` for a device string that is not one."""
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
            raise ValueError(f"device {device!r}: use cpu, cuda, cuda:N or auto")
        cuda = device.startswith("cuda")
        dtype = DTYPES[self.dtype] if self.dtype else (torch.float16 if cuda else torch.float32)
        return device, dtype


def check_present(device: str) -> None:
    """``ValueError`` unless ``device`` (as ``resolve_device`` gives it) is on this machine: a worker
    asked for CUDA on a CPU node (or a CPU build of torch) says so at start, not at its first task."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch has no CUDA device (a CPU build, or no GPU)")
    count = torch.cuda.device_count()
    if ":" in device and int(device.split(":")[1]) >= count:
        raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s)")


def _check_budget(value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"memory_budget_mb must be a number of MiB above 0, not {value!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, not {value!r}")


def apply_options(pipe: Any, opts: DiffusersOptions, device: str) -> None:
    """Set attention, memory format, compilation and VAE tiling on a loaded pipeline."""
    from diffusers.models import attention_processor

    procs: Any = attention_processor  # untyped constructors, which mypy --strict refuses to call
    cuda = device.startswith("cuda")
    processor = procs.AttnProcessor2_0() if opts.attention == "sdpa" else procs.AttnProcessor()
    pipe.unet.set_attn_processor(processor)
    channels_last = cuda if opts.channels_last is None else opts.channels_last
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if opts.vae_tiling:
        pipe.vae.enable_tiling()
    if opts.compile and not cuda:
        log.info("compile option skipped: torch.compile with reduce-overhead needs CUDA (device %s)", device)
    elif opts.compile:
        # The first run at each size compiles (minutes on SD 1.5); later runs at that size are fast.
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXT)


def release_memory(device: str, error: BaseException | None = None) -> None:
    """Drop what a failed run still holds (its frames' tensors), collect, and empty the CUDA cache."""
    if error is not None:
        traceback.clear_frames(error.__traceback__)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def check_size(params: TaskParams, kind: TaskType, limit: int) -> None:
    """Refuse a generation of more than ``limit`` pixels an image before it runs (``Reject``
    ``too_large``). The API bounds width and height at submit, but a message published straight to
    the topic (the seed's Lambda, a script) is not checked there, and size, not memory, is what such
    a task would spend: a 4096² text-to-image fits a large GPU and runs at least 16 times as long as
    1024², and is retried after each timeout."""
    second = hires.plan(kind, params)
    width, height = second.size if second else (params.width, params.height)
    pixels = width * height
    if pixels > limit:
        made = ", its hires pass" if second else ""
        raise Reject(
            f"{kind.value} at {width}x{height}{made} ({pixels} pixels) is more than the "
            f"{limit} the runtime allows (generate_max_pixels); use a smaller width/height",
            code="too_large",
        )
    varied = variation.read(params)
    if varied is not None and varied.resize_from is not None:
        width, height = varied.resize_from
        if width * height > limit:  # its noise is made at that size
            raise Reject(
                f"seed_resize_from {width}x{height} is more than the {limit} pixels the runtime "
                "allows (generate_max_pixels)",
                code="too_large",
            )


def out_of_memory(params: TaskParams, device: str, img2img: bool) -> Reject:
    """The task error for a run that did not fit.

    A ``Reject``, not a retry: the same size and batch on the same device needs the same memory
    again, and a fleet's queue is served by one kind of GPU, so a retry would only spend attempts.
    (The runtime turns it into a retry when it could unload other cached models first.)
    """
    what = "image-to-image" if img2img else "text-to-image"
    return Reject(
        f"out of memory on {device}: {what} of {params.batch_size} image(s) at "
        f"{params.width}x{params.height}; use a smaller width/height or batch_size "
        "(or turn on the runtime's vae_tiling option)",
        code="out_of_memory",
    )
