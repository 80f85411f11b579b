"""Load against a running API: a mix of seed-format and v1 tasks, each followed to its end.

Works against anything that serves sdfleet's API: ``sdfleet up`` on this machine, or a deployment.
Submits for ``--duration`` seconds, either open loop at ``--rate`` tasks/s or closed loop with
``--users`` clients that each submit, wait for the end and submit again; follows every task over
its event stream (``GET /v1/tasks/{id}/events``, or polling with ``--follow poll``) and waits up to
``--drain-s`` for the last ones. Prints and writes (``--output``, default
``bench/results/load-<time>.json``) submit latency and end-to-end latency p50/p95/p99, throughput,
and errors by code, in all and per entry of the mix.

    sdfleet bench run load -- --api-url http://127.0.0.1:8080 --rate 5 --duration 30
    sdfleet bench run load -- --api-url https://sd.example.com --api-key $KEY --users 16 --mix mix.yaml

A mix file (YAML or JSON) is a list of entries ``{name, weight, format: v1|v1alpha1|v1alpha2, body}``;
the string ``$MODEL`` anywhere in a body becomes ``--model`` (default: the first model of
``GET /v1/models``) and every seed-format task gets a fresh id. Without one, the mix is 60 % v1,
20 % v1alpha1 and 20 % v1alpha2 text-to-image tasks of 2 steps at 64x64.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console
from rich.table import Table

from sdfleet.cli_common import print_table

RESULTS = Path(__file__).parent / "results"
TERMINAL = {"succeeded", "failed", "cancelled"}
SMALL = {"prompt": "a lighthouse at dusk", "steps": 2, "width": 64, "height": 64}
DEFAULT_MIX: list[dict[str, Any]] = [
    {"name": "v1", "weight": 6, "format": "v1", "body": {"model": "$MODEL", "params": SMALL}},
    {
        "name": "seed-v1alpha1",
        "weight": 2,
        "format": "v1alpha1",
        "body": {**SMALL, "alwayson_scripts": {"task": "text-to-image", "sd_model_checkpoint": "$MODEL"}},
    },
    {
        "name": "seed-v1alpha2",
        "weight": 2,
        "format": "v1alpha2",
        "body": {
            "task": {
                "metadata": {"runtime": "sdruntime", "tasktype": "text-to-image", "prefix": "output"},
                "content": {**SMALL, "alwayson_scripts": {"sd_model_checkpoint": "$MODEL"}},
            }
        },
    },
]
PATHS = {"v1": "/v1/tasks", "v1alpha1": "/v1alpha1/", "v1alpha2": "/v1alpha2/"}


@dataclass
class Outcome:
    entry: str
    submit_s: float | None = None
    e2e_s: float | None = None
    error: str | None = None
    """``http_<status>:<code>`` for a refused submit, ``task:<code>`` for a failed task,
    ``unfinished`` when it did not end within the drain time."""


@dataclass
class Run:
    args: argparse.Namespace
    http: httpx.AsyncClient
    mix: list[dict[str, Any]]
    outcomes: list[Outcome] = field(default_factory=list)
    inflight: set[asyncio.Task[None]] = field(default_factory=set)
    prefix: str = field(default_factory=lambda: f"load-{uuid.uuid4().hex[:8]}")
    count: int = 0

    def pick(self) -> dict[str, Any]:
        return random.choices(self.mix, weights=[float(e.get("weight", 1)) for e in self.mix])[0]

    def body(self, entry: dict[str, Any]) -> dict[str, Any]:
        self.count += 1
        body: dict[str, Any] = _substitute(copy.deepcopy(entry["body"]), self.args.model)
        task_id = f"{self.prefix}-{self.count}"
        if entry["format"] == "v1alpha1":
            body.setdefault("alwayson_scripts", {})["id_task"] = task_id
        elif entry["format"] == "v1alpha2":
            body["task"]["metadata"]["id"] = task_id
        return body


def _substitute(value: Any, model: str) -> Any:
    if value == "$MODEL":
        return model
    if isinstance(value, dict):
        return {k: _substitute(v, model) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, model) for v in value]
    return value


def _task_id(fmt: str, answer: dict[str, Any]) -> str:
    return str(answer["id_task"] if fmt == "v1alpha1" else answer["id"])


def _error(r: httpx.Response) -> str:
    try:
        code = r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "unreadable"
    return f"http_{r.status_code}:{code}"


async def one_task(run: Run) -> Outcome:
    """Submit one task of the mix and follow it to its end."""
    entry = run.pick()
    outcome = Outcome(entry.get("name", entry["format"]))
    started = time.perf_counter()
    try:
        r = await run.http.post(PATHS[entry["format"]], json=run.body(entry))
        outcome.submit_s = time.perf_counter() - started
        if r.status_code >= 400:
            outcome.error = _error(r)
            return outcome
        task_id = _task_id(entry["format"], r.json())
        deadline = time.monotonic() + run.args.duration + run.args.drain_s
        follow = _follow_sse if run.args.follow == "sse" else _follow_poll
        view = await asyncio.wait_for(follow(run, task_id), max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        outcome.error = "unfinished"
        return outcome
    except httpx.HTTPError as e:
        outcome.error = f"connection:{type(e).__name__}"
        return outcome
    outcome.e2e_s = time.perf_counter() - started
    if view.get("state") != "succeeded":
        outcome.error = f"task:{(view.get('error') or {}).get('code', view.get('state'))}"
    return outcome


async def _follow_sse(run: Run, task_id: str) -> dict[str, Any]:
    async with run.http.stream("GET", f"/v1/tasks/{task_id}/events") as r:
        if r.status_code >= 400:
            await r.aread()
            return {"state": "failed", "error": {"code": _error(r)}}
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event.get("state") in TERMINAL:
                    return dict(event)
    return await _follow_poll(run, task_id)  # the stream ended early: ask


async def _follow_poll(run: Run, task_id: str) -> dict[str, Any]:
    while True:
        r = await run.http.get(f"/v1/tasks/{task_id}")
        if r.status_code == 200 and r.json()["state"] in TERMINAL:
            return dict(r.json())
        await asyncio.sleep(run.args.poll_s)


async def open_loop(run: Run) -> None:
    """``--rate`` submissions a second, on schedule whatever the answers take."""
    begin = time.perf_counter()
    for n in range(math.ceil(run.args.rate * run.args.duration)):
        delay = begin + n / run.args.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_record(run))
        run.inflight.add(task)
        task.add_done_callback(run.inflight.discard)
    await asyncio.gather(*run.inflight)


async def closed_loop(run: Run) -> None:
    """``--users`` clients, each submitting its next task when the last one ended."""
    stop_at = time.perf_counter() + run.args.duration

    async def user() -> None:
        while time.perf_counter() < stop_at:
            await _record(run)

    await asyncio.gather(*(user() for _ in range(run.args.users)))


async def _record(run: Run) -> None:
    run.outcomes.append(await one_task(run))


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 4)

    mean = round(sum(ordered) / len(ordered), 4)
    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "mean": mean, "max": round(ordered[-1], 4)}


def summary(outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    done = [o for o in outcomes if o.e2e_s is not None and o.error is None]
    return {
        "submitted": sum(
            1 for o in outcomes if o.submit_s is not None and not (o.error or "").startswith("http_")
        ),
        "attempted": len(outcomes),
        "succeeded": len(done),
        "errors": dict(Counter(o.error for o in outcomes if o.error)),
        "submit_latency_s": percentiles([o.submit_s for o in outcomes if o.submit_s is not None]),
        "e2e_latency_s": percentiles([o.e2e_s for o in done if o.e2e_s is not None]),
        "throughput_per_s": round(len(done) / wall_s, 3) if wall_s > 0 else 0.0,
    }


async def resolve_model(http: httpx.AsyncClient) -> str:
    r = await http.get("/v1/models")
    r.raise_for_status()
    models = r.json()
    if not models:
        raise SystemExit("the API lists no models: give --model")
    return str(models[0]["name"])


def load_mix(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return DEFAULT_MIX
    mix = yaml.safe_load(path.read_text())
    if not isinstance(mix, list) or not mix:
        raise SystemExit(f"{path}: a mix is a non-empty list of {{name, weight, format, body}}")
    for entry in mix:
        if (
            not isinstance(entry, dict)
            or entry.get("format") not in PATHS
            or not isinstance(entry.get("body"), dict)
        ):
            raise SystemExit(f"{path}: each entry needs format (one of {', '.join(PATHS)}) and a body object")
    return list(mix)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sdfleet bench run load --", description=__doc__.split("\n\n")[0])
    p.add_argument("--api-url", required=True, help="Base URL of the API.")
    p.add_argument(
        "--api-key", default=os.environ.get("SDFLEET_API_KEY"), help="API key (or SDFLEET_API_KEY)."
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rate", type=float, help="Open loop: tasks submitted per second.")
    how.add_argument("--users", type=int, help="Closed loop: clients (default 4 when no --rate).")
    p.add_argument("--duration", type=float, default=30.0, help="Seconds of submitting (default 30).")
    p.add_argument("--drain-s", type=float, default=120.0, help="Wait for unfinished tasks after that.")
    p.add_argument("--mix", type=Path, help="Mix file (YAML/JSON); default: v1 and both seed formats.")
    p.add_argument("--model", help="Replaces $MODEL in the mix (default: the API's first model).")
    p.add_argument("--follow", choices=["sse", "poll"], default="sse", help="How tasks are followed.")
    p.add_argument("--poll-s", type=float, default=0.5, help="Poll period with --follow poll.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the mix's random choices.")
    p.add_argument("--output", type=Path, help="JSON results (default bench/results/load-<time>.json).")
    args = p.parse_args(argv)
    if args.rate is None and args.users is None:
        args.users = 4
    if (args.rate is not None and args.rate <= 0) or (args.users is not None and args.users < 1):
        p.error("--rate must be > 0 and --users >= 1")
    return args


def report(result: dict[str, Any], console: Console) -> None:
    table = Table(
        "mix entry", "tasks", "ok", "submit p50/p95/p99 (s)", "end to end p50/p95/p99 (s)", "errors"
    )
    for name, s in {**result["by_entry"], "all": result["all"]}.items():
        sub, e2e = s["submit_latency_s"], s["e2e_latency_s"]
        errors = ", ".join(f"{k} ×{v}" for k, v in s["errors"].items()) or "-"
        table.add_row(name, str(s["attempted"]), str(s["succeeded"]), _triple(sub), _triple(e2e), errors)
    print_table(table, console)
    a = result["all"]
    console.print(f"throughput {a['throughput_per_s']} tasks/s over {result['wall_s']} s", soft_wrap=True)


def _triple(p: dict[str, float | None]) -> str:
    return "/".join("-" if p[k] is None else f"{p[k]:.3f}" for k in ("p50", "p95", "p99"))


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    random.seed(args.seed)
    mix = load_mix(args.mix)  # a missing or bad file is said before any request
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    timeout = httpx.Timeout(60.0, read=None)  # event streams stay open as long as their tasks run
    async with httpx.AsyncClient(
        base_url=args.api_url, headers=headers, limits=limits, timeout=timeout
    ) as http:
        args.model = args.model or await resolve_model(http)
        run = Run(args, http, mix)
        began = time.perf_counter()
        await (open_loop(run) if args.rate is not None else closed_loop(run))
        wall = time.perf_counter() - began
    by_entry = {}
    for name in sorted({o.entry for o in run.outcomes}):
        by_entry[name] = summary([o for o in run.outcomes if o.entry == name], wall)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "api_key"}
    total = summary(run.outcomes, wall)
    return {
        "scenario": "load",
        "settings": settings,
        "wall_s": round(wall, 3),
        "all": total,
        "by_entry": by_entry,
    }


def main(argv: list[str]) -> int:
    args = parse(argv)
    console = Console()
    mode = f"{args.rate}/s open loop" if args.rate is not None else f"{args.users} users"
    console.print(f"load on {args.api_url}: {mode} for {args.duration:g} s", soft_wrap=True)
    try:
        result = asyncio.run(run_load(args))
    except httpx.TransportError as e:  # nothing answers at --api-url: one line, not a traceback
        Console(stderr=True).print(f"[red]error:[/red] cannot reach {args.api_url}: {e}", soft_wrap=True)
        return 2
    report(result, console)
    out = args.output or RESULTS / f"load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {out}", soft_wrap=True, highlight=False)
    return 0 if result["all"]["errors"] == {} else 1


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
