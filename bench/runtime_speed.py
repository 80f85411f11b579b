"""Per-image generation time of the diffusers runtime, warm-up excluded.

Times ``DiffusersRuntime.run`` (the path an agent takes: options applied, PNG encoding included)
for one model at several sizes, for one or more option sets, prints a table and writes JSON to
``bench/results/``. Examples:

    # tiny random-weight model on CPU (seconds)
    python bench/runtime_speed.py --make-tiny /tmp/models --sizes 64,256,512 --steps 2

    # SD 1.5 architecture, random weights, on a GPU: without and with the CUDA options
    python bench/runtime_speed.py --make-random-sd15 /tmp/models --sizes 512 --steps 20 \\
        --variant plain:dtype=fp32,attention=classic,channels_last=false \\
        --variant fp16:dtype=fp16,channels_last=false \\
        --variant cuda-opts:dtype=fp16,channels_last=true,compile=true

    # an existing model folder or single file
    python bench/runtime_speed.py --model ./models/v1-5-pruned-emaonly.safetensors --sizes 512

    # a task's own fields (``task.NAME=value``): SD WebUI's NGMS against none, on one runtime
    python bench/runtime_speed.py --make-random-sd15 /tmp/models --sizes 128 --steps 20 \\
        --variant plain: --variant ngms-2:task.s_min_uncond=2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sdfleet.models import ModelCatalog
from sdfleet.runtimes._diffusers_opts import DiffusersOptions
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType

RESULTS = Path(__file__).parent / "results"


TASK = "task."
"""A variant's key naming a field of the timed task (``extra``), not a runtime option."""


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``label:key=value,key=value`` → (label, options); true/false become booleans, and a
    ``task.`` key's value a number where it reads as one."""
    label, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        low, key = value.lower(), key.strip()
        options[key] = low == "true" if low in ("true", "false") else value
        if key.startswith(TASK) and isinstance(options[key], str):
            try:
                options[key] = float(value)
            except ValueError:
                pass
    return label or "default", options


def model_path(args: argparse.Namespace) -> Path:
    if args.make_tiny:
        from sdfleet.models.tiny import make_tiny

        folder = Path(args.make_tiny) / ("tiny-xl-bench" if args.sdxl else "tiny-bench")
        return folder if folder.is_dir() else make_tiny(folder.parent, folder.name, sdxl=args.sdxl)
    if args.make_random_sd15:
        from sdfleet.models.random_sd15 import make_random_sd15

        folder = Path(args.make_random_sd15) / "random-sd15"
        return folder if folder.is_dir() else make_random_sd15(folder.parent, folder.name)
    if args.model is None:
        sys.exit("give --model PATH, --make-tiny DIR or --make-random-sd15 DIR")
    return Path(args.model)


def job(size: int, args: argparse.Namespace, fields: dict[str, Any] | None = None) -> Job:
    params = TaskParams.model_validate(
        {
            "prompt": "a lighthouse on a cliff at dusk, oil painting",
            "negative_prompt": "blurry",
            "steps": args.steps,
            "width": size,
            "height": size,
            "batch_size": args.batch,
            "seed": 1234,
            "sampler": args.sampler,
            "extra": fields or {},
        }
    )
    return Job("bench", TaskType.TEXT_TO_IMAGE, None, params)


async def no_progress(value: float) -> None:
    return None


async def time_variant(
    path: Path, label: str, options: dict[str, Any], args: argparse.Namespace
) -> list[dict[str, Any]]:
    fields = {k.removeprefix(TASK): v for k, v in options.items() if k.startswith(TASK)}
    opts = DiffusersOptions.parse({k: v for k, v in options.items() if not k.startswith(TASK)})
    runtime = DiffusersRuntime(ModelCatalog(path.parent), default_model=path.name, options=opts)
    began = time.perf_counter()
    await runtime.start()
    load_s = time.perf_counter() - began
    rows = []
    for size in args.sizes:
        for _ in range(args.warmup):
            await runtime.run(job(size, args, fields), no_progress)
        times = []
        for _ in range(args.repeat):
            began = time.perf_counter()
            await runtime.run(job(size, args, fields), no_progress)
            times.append((time.perf_counter() - began) / args.batch)
        rows.append(
            {
                "variant": label,
                "options": options,
                "device": runtime.device,
                "dtype": str(runtime.dtype).removeprefix("torch."),
                "size": size,
                "s_per_image_mean": statistics.mean(times),
                "s_per_image_min": min(times),
                "s_per_image_stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
                "load_s": load_s,
            }
        )
        print(f"  {label} {size}x{size}: {rows[-1]['s_per_image_mean']:.4f} s/image", flush=True)
    await runtime.aclose()
    return rows


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = f"steps {args.steps}, batch {args.batch}, sampler {args.sampler}, mean of {args.repeat}"
    head += f" after {args.warmup} warm-up\n"
    lines = ["| variant | device | dtype | size | s/image (mean) | min | stdev |", "|---" * 7 + "|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['device']} | {r['dtype']} | {r['size']}x{r['size']} "
            f"| {r['s_per_image_mean']:.4f} | {r['s_per_image_min']:.4f} | {r['s_per_image_stdev']:.4f} |"
        )
    return head + "\n".join(lines)


def arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="a diffusers model folder or a single-file checkpoint")
    src.add_argument("--make-tiny", metavar="DIR", help="build (once) and time a tiny model in DIR")
    src.add_argument("--make-random-sd15", metavar="DIR", help="build (once) a random SD 1.5 in DIR")
    ap.add_argument("--sdxl", action="store_true", help="with --make-tiny: the tiny SDXL model")
    ap.add_argument("--sizes", default="512", help="comma-separated square sizes (default 512)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sampler", default="Euler")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per size (compile happens here)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--variant", action="append", default=[], help="label:key=value,... (repeatable)")
    ap.add_argument("--option", action="append", default=[], help="key=value for a single variant")
    ap.add_argument("--results", type=Path, default=RESULTS, help=f"JSON goes here (default {RESULTS})")
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if not args.variant:
        args.variant = ["default:" + ",".join(args.option)]
    return args


async def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = arguments(argv)
    path = model_path(args)
    rows: list[dict[str, Any]] = []
    for text in args.variant:
        label, options = parse_variant(text)
        rows += await time_variant(path, label, options, args)
    print(table(rows, args))
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"runtime_speed-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    settings = {k: getattr(args, k) for k in ("steps", "batch", "sampler", "warmup", "repeat")}
    out.write_text(json.dumps({"model": str(path), **settings, "machine": machine(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    asyncio.run(main())
