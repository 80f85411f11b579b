"""Smoke tests of the benchmark scenarios and ``sdfleet bench``: tiny runs, JSON written and sane."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fakes.servers import a1111_server, free_port
from sdfleet.bench import find_bench_dir, list_scenarios, load_scenario
from sdfleet.cli import app
from sdfleet.errors import ConfigError

BENCH = Path(__file__).resolve().parents[2] / "bench"


def ordered(p: dict[str, float]) -> bool:
    return 0 <= p["p50"] <= p["p95"] <= p["p99"] <= p["max"]


def test_fleet_throughput_on_sqlite_writes_sane_json(tmp_path: Path) -> None:
    bench = load_scenario(BENCH, "fleet_throughput")
    argv = ["--tasks", "20", "--agents", "2", "--latency-s", "0.02", "--poll-sample", "5", "--no-progress"]
    assert bench.main([*argv, "--results", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("fleet_throughput-sqlite-*.json")
    report: dict[str, Any] = json.loads(written.read_text())
    assert report["tasks"] == {
        "submitted": 20,
        "accepted": 20,
        "submit_errors": 0,
        "succeeded": 20,
        "failed": 0,
        "incomplete": 0,
    }
    lat = report["latency_s"]
    for name in ("submit", "e2e_record", "queue_wait", "start_wait", "runtime_run", "overhead_after_start"):
        assert lat[name]["n"] == 20 and ordered(lat[name]), (name, lat[name])
    assert lat["e2e_poll"]["n"] == 5 and ordered(lat["e2e_poll"]) and ordered(lat["poll_lag"])
    assert lat["runtime_run"]["p50"] >= 0.02  # the synthetic runtime really waited
    assert lat["e2e_record"]["p50"] >= lat["queue_wait"]["p50"] + 0.02
    tp = report["throughput"]
    assert tp["tasks_per_s"] > 0 and tp["ideal_tasks_per_s"] == pytest.approx(100.0)
    assert report["settings"]["agents"] == 2 and report["engine"] == "sqlite"


def test_bench_run_passes_arguments_to_runtime_speed(tmp_path: Path) -> None:
    argv = ["bench", "run", "runtime_speed", "--bench-dir", str(BENCH), "--"]
    argv += ["--make-tiny", str(tmp_path / "models"), "--sizes", "64", "--steps", "2"]
    argv += ["--warmup", "0", "--repeat", "1", "--results", str(tmp_path / "out")]
    argv += ["--variant", "plain:", "--variant", "ngms:task.s_min_uncond=1000,attention=sdpa"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    (written,) = (tmp_path / "out").glob("runtime_speed-tiny-bench-*.json")
    data = json.loads(written.read_text())
    plain, ngms = data["rows"]
    assert (plain["size"], data["steps"], data["repeat"]) == (64, 2, 1)
    assert plain["s_per_image_mean"] > 0 and ngms["s_per_image_mean"] > 0
    # a task field beside a runtime option: the task's number, the option's text
    assert ngms["options"] == {"task.s_min_uncond": 1000.0, "attention": "sdpa"} and plain["options"] == {}


def test_scenarios_are_found_and_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scenarios = list_scenarios(BENCH)
    names = [s.name for s in scenarios]
    assert all(s.summary and "``" not in s.summary for s in scenarios)  # `bench list` shows them as written
    assert {"fleet_throughput", "runtime_speed"} <= set(names)
    assert not any(n.startswith("_") for n in names)  # helpers are not scenarios
    assert find_bench_dir(start=BENCH / "results") == BENCH
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="sdfleet checkout"):
        find_bench_dir()
    result = CliRunner().invoke(app, ["bench", "run", "nope", "--bench-dir", str(BENCH)])
    assert result.exit_code == 2 and "no scenario 'nope'" in result.output
    result = CliRunner().invoke(app, ["bench", "list", "--bench-dir", str(BENCH)])
    assert result.exit_code == 0 and "fleet_throughput" in result.output


def test_agent_busy_counts_engine_calls(tmp_path: Path) -> None:
    bench = load_scenario(BENCH, "agent_busy")
    argv = ["--engines", "sqlite", "--latencies-ms", "20", "--tasks", "12", "--repeat", "1"]
    assert bench.main([*argv, "--results", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("agent_busy-*.json")
    (row,) = json.loads(written.read_text())["rows"]
    assert (row["engine"], row["tasks"], row["succeeded"]) == ("sqlite", 12, 12)
    assert 0 < row["busy"] <= 1.05  # tasks × latency / wall: at most the ideal, allowing clock grain
    calls = row["calls_per_task"]
    # per task: one record read, a start and a success write, the image and its .out, a result
    # notification, an ack; receives fetch several messages at a time
    assert calls["store.get"] == 1 and calls["store.compare_and_set"] == 2 and calls["storage.put"] == 2
    assert calls["bus.publish"] == 1 and calls["bus.ack"] == 1 and calls["bus.receive"] < 1


def test_model_order_cuts_switches(tmp_path: Path) -> None:
    bench = load_scenario(BENCH, "model_order")
    argv = ["--tasks", "80", "--models", "4", "--latency-ms", "2", "--switch-ms", "5", "--bound-s", "5"]
    assert bench.main([*argv, "--results", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("model_order-*.json")
    fifo, aware = json.loads(written.read_text())["rows"]
    assert (fifo["order"], aware["order"]) == ("fifo", "model-aware")
    assert fifo["succeeded"] == aware["succeeded"] == 80
    assert aware["switches"] < fifo["switches"]


@pytest.mark.timeout(300)  # builds a model and loads torch twice
@pytest.mark.parametrize("inpaint", [False, True])
def test_agent_batching_through_the_agent(tmp_path: Path, inpaint: bool) -> None:
    """Every task succeeds (the scenario raises otherwise): text tasks, or masked ones."""
    bench = load_scenario(BENCH, "agent_batching")
    argv = ["--batches", "1", "2", "--tasks", "4", "--steps", "1", "--repeat", "1"]
    assert bench.main([*argv, *(["--inpaint"] if inpaint else []), "--results", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("agent_batching-*.json")
    report = json.loads(written.read_text())
    assert report["args"]["inpaint"] == str(inpaint)
    rows = report["rows"]
    assert [r["max_batch"] for r in rows] == [1, 2]
    assert all(r["agent_ips"] > 0 and r["pipeline_ips"] > 0 for r in rows)


def test_submit_throughput_runs_both_servers_and_writes_json(tmp_path: Path) -> None:
    bench = load_scenario(BENCH, "submit_throughput")
    src = Path(__file__).resolve().parents[2] / "src"
    argv = ["--tasks", "40", "--warmup", "5", "--clients", "4", "--workers", "1", "--rounds", "1"]
    assert bench.main([*argv, "--src", str(src), "--results", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("submit_throughput-api-*.json")
    report: dict[str, Any] = json.loads(written.read_text())
    rounds = report["rounds"]
    assert [r["label"] for r in rounds] == ["this checkout", f"--src {src}"]
    for r in rounds:
        assert r["accepted"] == 40 and r["status"] == {"202": 40} and r["accepted_per_s"] > 0
        assert r["latency_ms"]["n"] == 40 and ordered(r["latency_ms"]) and r["cpu_ms_per_request"] > 0


@pytest.mark.timeout(300)  # builds two tiny models
def test_harness_ceiling_drives_an_sd_webui_api(tmp_path: Path) -> None:
    server = a1111_server(tmp_path / "models", free_port())
    try:
        bench = load_scenario(BENCH, "harness_ceiling")
        out = tmp_path / "ceiling.json"
        argv = ["--url", server.url, "--latencies-ms", "0", "--tasks", "3", "--size", "64", "--repeat", "1"]
        assert bench.main([*argv, "--out", str(out)]) == 0
    finally:
        server.stop()
    doc = json.loads(out.read_text())
    (run,) = doc["runs"]["0.0"]
    assert run["tasks"] == 3 and run["tasks_per_s"] > 0
    # no nominal latency, no busy; a real server has no /_bench/stats, so no server-side count
    assert "busy" not in run and "server_busy" not in run
