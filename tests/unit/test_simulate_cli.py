"""``sdfleet simulate`` end to end on small workloads, ``--sweep``, and ``deploy values --simulated``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from sdfleet.cli import app

FLEET = {
    "queues": [
        {"name": "sd15", "filter": {"sd_model_checkpoint": ["sd15"]}, "model": "sd15",
         "scaling": {"min": 0, "max": 6, "target_backlog": 5}},
        {"name": "dynamic", "filter": {"sd_model_checkpoint": [{"anything-but": ["sd15"]}]},
         "scaling": {"min": 0, "max": 4, "target_backlog": 5}},
    ],
    "tenants": {"0" * 64: {"name": "paidco", "tier": "paid"}},
}  # fmt: skip
WORKLOAD = {
    "duration_s": 600,
    "rate": 0.5,
    "bursts": [{"at_s": 120, "duration_s": 60, "rate": 4}],
    "mix": [
        {"model": "sd15", "steps": 30, "weight": 3},
        {"model": "sdxl", "width": 1024, "height": 1024, "steps": 30, "tenant": "paidco", "weight": 1},
    ],
}
FAST_NODES = {"nodes": {"launch_s": 30, "image_pull_s": 0, "interruptions_per_node_hour": 1}}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {
        "fleet": tmp_path / "sdfleet.yaml",
        "trace": tmp_path / "burst.yaml",
        "params": tmp_path / "p.yaml",
    }
    out["fleet"].write_text(yaml.safe_dump(FLEET))
    out["trace"].write_text(yaml.safe_dump(WORKLOAD))
    out["params"].write_text(yaml.safe_dump(FAST_NODES))
    return out


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def common(files: dict[str, Path]) -> list[str]:
    return [
        "simulate",
        "-c",
        str(files["fleet"]),
        "--trace",
        str(files["trace"]),
        "--params",
        str(files["params"]),
    ]


def said(r: Any) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(r.output.split())


def test_simulate_writes_summary_settings_and_plots(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = invoke(*common(files), "--gpu", "a10g", "--out", str(out))
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert set(s["queues"]) == {"sd15", "dynamic"} and s["nodes"]["gpu"] == "a10g"
    for q in s["queues"].values():
        assert q["completed"] == q["arrived"] > 0 and q["left"] == 0
        assert 0 < q["queue_wait_s"]["p50"] <= q["queue_wait_s"]["p95"] <= q["queue_wait_s"]["p99"]
        assert q["e2e_s"]["p50"] <= q["e2e_s"]["p95"] and q["replicas"]["peak"] >= 1
    assert set(s["tiers"]) == {"standard", "paid"} and set(s["queues"]["dynamic"]["tiers"]) == {"paid"}
    cost = s["nodes"]["cost_usd"]
    assert cost["total"] == pytest.approx(cost["spot"] + cost["on_demand"]) and cost["total"] > 0
    assert s["nodes"]["gpu_hours"]["total"] * 1.006 * 0.35 == pytest.approx(cost["spot"], rel=0.01)
    settings = yaml.safe_load((out / "settings.yaml").read_text())
    assert (
        settings["queues"]["sd15"]["targetBacklog"] == 5
        and settings["queues"]["dynamic"]["maxReplicaCount"] == 4
    )
    for name in ("backlog.png", "replicas.png", "latency.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "sd15" in said(r) and "GPU-hours" in said(r)
    # the table at its natural width, on an 80-column console too: no figure or heading cut to "…"
    assert "…" not in r.output and "switches" in r.output and "cold starts" in r.output
    for name, q in s["queues"].items():
        assert re.search(rf"\b{name}\b.*\b{q['completed']:.0f}/{q['arrived']:.0f}\b", r.output), r.output


def test_aggregate_mode_from_the_command_line(files: dict[str, Path], tmp_path: Path) -> None:
    r = invoke("simulate", "-c", str(files["fleet"]), "--trace", str(files["trace"]), "--resolution", "1",
               "--params", str(files["params"]), "--out", str(tmp_path))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "aggregate, 1 s bins" in said(r)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["resolution_s"] == 1.0 and all(q["completed"] == q["arrived"] for q in s["queues"].values())


def test_a_csv_trace_and_its_errors(files: dict[str, Path], tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text(
        "time,model,width,height,steps,tenant,count\n0,sd15,512,512,30,acme,20\n5,other,512,512,20,b,3\n"
    )
    r = invoke("simulate", "-c", str(files["fleet"]), "--trace", str(trace), "--params", str(files["params"]))
    assert r.exit_code == 0, r.output
    trace.write_text("time,model,width,height,steps,tenant\n0,sd15,500,512,30,acme\n")
    r = invoke("simulate", "-c", str(files["fleet"]), "--trace", str(trace))
    assert r.exit_code == 2 and "multiple of 8" in said(r)
    r = invoke("simulate", "-c", str(files["fleet"]), "--trace", str(files["trace"]), "--gpu", "b9000")
    assert r.exit_code == 2 and "no performance figures for GPU 'b9000'" in said(r)
    missing = tmp_path / "missing.csv"
    r = invoke("simulate", "-c", str(files["fleet"]), "--trace", str(missing))
    assert r.exit_code == 2 and said(r) == f"error: cannot read trace {missing}: No such file or directory"


HEAD = "time,model,width,height,steps,tenant,count\n"


@pytest.mark.parametrize(
    ("name", "text", "words"),
    [
        (
            "t.csv",
            HEAD + "0,sd15,512,512,30,a,0\n",
            "t.csv:2: count: Input should be greater than or equal to 1 (got '0')",
        ),
        (
            "t.csv",
            HEAD + "-5,sd15,512,512,30,a,1\n",
            "t.csv:2: time: Input should be greater than or equal to 0 (got '-5')",
        ),
        (
            "t.csv",
            HEAD + "0,sd15,512,512,30,a,1\nnan,sd15,512,512,30,a,1\n",
            "t.csv:3: time: Input should be a finite number",
        ),
        ("t.csv", HEAD + "inf,sd15,512,512,30,a,1\n", "t.csv:2: time: Input should be a finite number"),
        ("t.csv", HEAD + "0,sd15,512,512,30,a,1.5\n", "t.csv:2: count: Input should be a valid integer"),
        ("t.csv", HEAD + "0,sd15,512,512,30,a,1,9\n", "t.csv:2: more cells than the header has columns"),
        ("t.csv", "time,stpes\n0,3\n", "t.csv:2: unknown column stpes (a trace's columns: time, model,"),
        (
            "t.csv",
            HEAD + "0,sd15,512,512,151,a,1\n",
            "would refuse sd15 512x512 151 steps, tenant a (standard): steps: Input should be less than",
        ),
        ("t.jsonl", '[0, "sd15"]\n', "t.jsonl:1: a JSON object is expected"),
        ("t.csv", HEAD + "0,sd15,4096,512,30,a,1\n", "output size 4096x512 is over the maximum 2048x2048"),
        ("w.yaml", "duration_s: 60\nrate: 0\n", "w.yaml: it draws no request"),
        (
            "w.yaml",
            "duration_s: 1.0e+12\nrate: 1\n",
            "duration_s: Input should be less than or equal to 2678400",
        ),
        ("w.yaml", "duration_s: 60\nrate: .inf\n", "rate: Input should be a finite number"),
        (
            "w.yaml",
            "duration_s: 60\nrate: 1\nmix: [{model: sd15, images: 40}]\n",
            "the diffusers runtime makes at most 16 images a task, not 40 (batch_size)",
        ),
    ],
)
def test_a_bad_trace_or_workload_is_one_line_naming_its_row(
    files: dict[str, Path], tmp_path: Path, name: str, text: str, words: str
) -> None:
    """Each of these was a traceback (count 0: a division by zero; a negative, NaN or infinite time,
    an infinite rate, a month's workload drawn per second in memory), taken as given (a negative
    count, an unknown column), or a Python repr and pydantic's raw text."""
    trace = tmp_path / name
    trace.write_text(text)
    r = invoke("simulate", "-c", str(files["fleet"]), "--trace", str(trace))
    assert r.exit_code == 2 and words in said(r) and "Traceback" not in r.output, r.output
    assert said(r).count("error:") == 1


def test_empty_cells_and_nulls_take_the_defaults(files: dict[str, Path], tmp_path: Path) -> None:
    csv_trace, json_trace = tmp_path / "t.csv", tmp_path / "t.jsonl"
    csv_trace.write_text(HEAD + "0,sd15,,,,,2\n")
    json_trace.write_text('{"time": 0, "model": "sd15", "width": null, "steps": null, "count": 2}\n')
    for trace in (csv_trace, json_trace):
        out = tmp_path / trace.suffix[1:]
        r = invoke(
            *common(files)[:3], "--trace", str(trace), "--params", str(files["params"]), "--out", str(out)
        )
        assert r.exit_code == 0, r.output
        assert said(r).startswith("2 requests over 0 s")
        assert json.loads((out / "summary.json").read_text())["queues"]["sd15"]["completed"] == 2


@pytest.mark.parametrize(
    ("flag", "name", "text", "words"),
    [
        (
            "--params",
            "p.yaml",
            "keda:\n  polling_s: .inf\n",
            "keda.polling_s: Input should be a finite number",
        ),
        (
            "--prices",
            "pr.yaml",
            "h200: {on_demand: .nan, spot: -1}\n",
            "price file {path}: h200.on_demand: Input should be a finite number (got nan); h200.spot: Input",
        ),
        ("--prices", "nope.yaml", None, "cannot read price file {path}: No such file or directory"),
        (
            "--params",
            "nope.yaml",
            None,
            "cannot read simulation parameters {path}: No such file or directory",
        ),
        ("--perf", "nope.json", None, "cannot read performance figures {path}: No such file or directory"),
    ],
)
def test_a_bad_side_file_is_one_line(
    files: dict[str, Path], tmp_path: Path, flag: str, name: str, text: str | None, words: str
) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    r = invoke(*common(files)[:5], flag, str(path))
    assert r.exit_code == 2 and words.format(path=path) in said(r) and "Traceback" not in r.output, r.output


def test_sweep_picks_the_cheapest_setting_meeting_the_objective(
    files: dict[str, Path], tmp_path: Path
) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"keda.min_replicas": [0, 2], "keda.target_backlog": [2, 50]}))
    out = tmp_path / "sweep"
    args = [*common(files), "--sweep", "--grid", str(grid), "--objective", "e2e_p95<=120", "--out", str(out)]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert len(rows) == 4
    met = [row for row in rows if row["met"]]
    assert met and all(row["worst_s"] <= 120 for row in met)
    best = min(met, key=lambda row: row["summary"]["nodes"]["cost_usd"]["total"])
    assert rows[0]["point"] == best["point"]  # cheapest meeting the objective first
    chosen = yaml.safe_load((out / "chosen.yaml").read_text())
    assert chosen["queues"]["sd15"]["minReplicaCount"] == best["point"]["keda.min_replicas"]
    assert chosen["queues"]["sd15"]["targetBacklog"] == best["point"]["keda.target_backlog"]
    again = invoke(
        *common(files)[:-2], "--params", str(out / "chosen-params.yaml"), "--out", str(tmp_path / "re")
    )
    assert again.exit_code == 0, again.output  # the chosen parameters simulate again as they are
    assert yaml.safe_load((tmp_path / "re" / "settings.yaml").read_text()) == chosen
    r = invoke(*args[:-4], "--objective", "e2e_p50<=0.01", "--grid", str(grid))
    assert r.exit_code == 1 and "no setting in the grid meets the objective" in said(r)
    r = invoke(*args[:-4], "--objective", "fast please")
    assert r.exit_code == 2 and "e2e_p95<=60" in said(r)


def test_deploy_values_take_the_simulated_settings(files: dict[str, Path], tmp_path: Path) -> None:
    chosen = tmp_path / "chosen.yaml"
    scaling = {"minReplicaCount": 1, "targetBacklog": 2, "cooldownPeriod": 300,
               "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60, "policies": []}}}  # fmt: skip
    chosen.write_text(yaml.safe_dump(
        {"queues": {"sd15": scaling}, "karpenter": {"gpuClasses": {"gpu": {"consolidateAfter": "30s"}}}}
    ))  # fmt: skip
    base = ["deploy", "values", "-c", str(files["fleet"]), "--engine", "redis", "--redis-address", "r:6379"]
    r = invoke(*base, "--simulated", str(chosen))
    assert r.exit_code == 0, r.output
    values = yaml.safe_load(r.output)
    sd15 = next(q for q in values["queues"] if q["name"] == "sd15")
    assert sd15["scaling"] == {"maxReplicaCount": 6, **scaling}  # the fleet's max kept, the rest chosen
    dynamic = next(q for q in values["queues"] if q["name"] == "dynamic")
    assert dynamic["scaling"]["targetBacklog"] == 5
    assert values["karpenter"] == {"gpuClasses": {"gpu": {"consolidateAfter": "30s"}}}
    chosen.write_text(yaml.safe_dump({"queues": {"nope": {"targetBacklog": 1}}}))
    r = invoke(*base, "--simulated", str(chosen))
    assert r.exit_code == 2 and "queue 'nope' is not in the fleet" in said(r)
    chosen.write_text(yaml.safe_dump({"queues": {"sd15": {"queueLength": 1}}}))
    r = invoke(*base, "--simulated", str(chosen))
    assert r.exit_code == 2 and "unknown scaling keys ['queueLength']" in said(r)
