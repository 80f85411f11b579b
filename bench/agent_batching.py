"""Dynamic batching through the whole agent: images/s by max_batch, next to diffusers alone.

A tiny random-weight SD pipeline (built here, no download) on this machine's device. For each
``max_batch`` a backlog of ``--tasks`` compatible text-to-image tasks (same size, steps, sampler;
own prompt and seed each) goes through one agent on the embedded SQLite engine, queue to stored
PNG; images/s = tasks / (last finish − first start). In the same run, the pipeline alone (no
agent, no storage) makes the same images in calls of that batch size: the agent's share of the
gain shows as the ratio of the two. Runs are interleaved ``--repeat`` times; medians reported.
``--inpaint``: inpainting tasks instead (image-to-image, strength 0.75, an input and a mask of
their own each, SD WebUI's "Only masked"), the inpainting pipeline alone beside them.

    python bench/agent_batching.py                      # 64x64, 4 steps, batches 1 2 4
    python bench/agent_batching.py --inpaint            # the same with masked tasks
    python bench/agent_batching.py --size 512 --steps 30 --batches 1 4 8 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sdfleet.cli_common import print_table
from sdfleet.tasks import Task, TaskParams, TaskType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _agent import backlog_run, engine_for, now_tag, settings_for, text_tasks
from _fleet import QUEUE

RESULTS = Path(__file__).parent / "results"
MODEL = "tiny-sd"


def build_model(root: Path, sd15_shaped: bool) -> None:
    if sd15_shaped:
        from sdfleet.models.random_sd15 import make_random_sd15

        make_random_sd15(root, MODEL)
    else:
        from sdfleet.models.tiny import make_tiny

        make_tiny(root, MODEL, seed=0)


async def through_agent(models: Path, batch: int, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory(prefix="sdfleet-batching-") as tmp:
        engine = engine_for("sqlite", Path(tmp))
        options = {"device": args.device, "max_batch": batch, "max_batch_wait_ms": 50}
        settings = settings_for(engine, Path(tmp), "diffusers", options, {}, models_dir=models)
        settings.fleet.models.default = MODEL
        tasks = masked_tasks(args) if args.inpaint else text_tasks(args.tasks, args.size, lambda i: MODEL)
        for t in tasks:
            t.params.steps = args.steps
        run = await backlog_run(settings, engine, tasks)
        engine.close()
    if run.states.get("succeeded", 0) != args.tasks:
        raise RuntimeError(f"max_batch {batch}: {dict(run.states)}")
    return float(args.tasks / run.wall_s)


STRENGTH = 0.75


def inputs(i: int, size: int) -> tuple[Any, Any]:
    """Task ``i``'s input (noise) and mask (a square of half the side, placed by ``i``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask, side = Image.new("L", (size, size), 0), size // 2
    x, y = (i * 7) % (size - side), (i * 13) % (size - side)
    mask.paste(255, (x, y, x + side, y + side))
    return image, mask


def data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def masked_tasks(args: argparse.Namespace) -> list[Task]:
    tasks = []
    for i in range(args.tasks):
        image, mask = inputs(i, args.size)
        params = TaskParams(
            prompt=f"bench {i}",
            width=args.size,
            height=args.size,
            seed=i,
            denoising_strength=STRENGTH,
            init_images=[data_url(image)],
            extra={"mask": data_url(mask)},
        )
        tasks.append(Task(type=TaskType.IMAGE_TO_IMAGE, model=MODEL, queue=QUEUE, params=params))
    return tasks


def pipeline_alone(models: Path, batch: int, args: argparse.Namespace) -> float:
    import torch

    from sdfleet.models.catalog import ModelCatalog
    from sdfleet.runtimes._diffusers_pipes import inpaint_from, load_pipeline
    from sdfleet.runtimes._diffusers_samplers import img2img_schedule

    info = ModelCatalog(models).resolve(MODEL)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = load_pipeline(info, args.device, dtype)
    size: dict[str, Any] = {"width": args.size, "height": args.size}
    steps = args.steps
    if args.inpaint:
        pipe = inpaint_from(pipe)
        # as the runtime asks for tasks naming no sampler: diffusers' strength, one step at least
        steps, _ = img2img_schedule(None, steps, STRENGTH)
    calls = max(1, args.tasks // batch)

    def call(first: int, prompts: list[str], generators: Any) -> None:
        more: dict[str, Any] = {}
        if args.inpaint:
            pairs = [inputs(first + i, args.size) for i in range(batch)]
            more = {"image": [a for a, _ in pairs], "mask_image": [b for _, b in pairs], "strength": STRENGTH}
        pipe(prompt=prompts, generator=generators, num_inference_steps=steps, **size, **more)

    with torch.inference_mode():
        call(0, ["warm-up"] * batch, None)
    t0 = time.perf_counter()
    for c in range(calls):
        generators = [torch.Generator("cpu").manual_seed(c * batch + i) for i in range(batch)]
        prompts = [f"bench {c * batch + i}" for i in range(batch)]
        with torch.inference_mode():
            call(c * batch, prompts, generators)
    return float(calls * batch / (time.perf_counter() - t0))


def arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--tasks", type=int, default=48)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sd15", action="store_true", help="an SD 1.5-shaped random model (GPU sizes)")
    ap.add_argument("--inpaint", action="store_true", help="masked image-to-image tasks (inpainting)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def table(rows: list[dict[str, Any]], inpaint: bool = False) -> Table:
    kind = "inpainting " if inpaint else ""
    t = Table(
        title=f"{kind}images/s by max_batch: through the agent (queue → stored PNG) and the pipeline alone"
    )
    for col in ("max_batch", "agent img/s", "× batch 1", "pipeline img/s", "× batch 1", "agent / pipeline"):
        t.add_column(col, justify="right")
    base_a, base_p = rows[0]["agent_ips"], rows[0]["pipeline_ips"]
    for r in rows:
        t.add_row(
            str(r["max_batch"]),
            f"{r['agent_ips']:.2f}",
            f"{r['agent_ips'] / base_a:.2f}",
            f"{r['pipeline_ips']:.2f}",
            f"{r['pipeline_ips'] / base_p:.2f}",
            f"{r['agent_ips'] / r['pipeline_ips']:.2f}",
        )
    return t


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    console = Console()
    samples: dict[int, dict[str, list[float]]] = {b: {"agent": [], "pipeline": []} for b in args.batches}
    with tempfile.TemporaryDirectory(prefix="sdfleet-models-") as tmp:
        models = Path(tmp)
        build_model(models, args.sd15)
        for r in range(args.repeat):
            for b in args.batches:
                console.print(f"[dim]repeat {r + 1}/{args.repeat}, max_batch {b}[/dim]")
                samples[b]["agent"].append(asyncio.run(through_agent(models, b, args)))
                samples[b]["pipeline"].append(pipeline_alone(models, b, args))
    rows = [
        {
            "max_batch": b,
            "agent_ips": round(statistics.median(s["agent"]), 3),
            "pipeline_ips": round(statistics.median(s["pipeline"]), 3),
            "samples": s,
        }
        for b, s in samples.items()
    ]
    print_table(table(rows, args.inpaint), console)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"agent_batching-{now_tag()}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
