"""The simulator's parts on their own: queue semantics, a GPU's schedule, traces, the GPU table, prices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import simpy

from sdfleet.errors import ConfigError
from sdfleet.simulate.params import load_params
from sdfleet.simulate.perf import DEFAULT_POINTS, PerfPoint, PerfTable, family_of, load_points
from sdfleet.simulate.pricing import SPOT_FRACTION, load_prices, price_for
from sdfleet.simulate.queue import Cohort, SimQueue
from sdfleet.simulate.schedule import Schedule
from sdfleet.simulate.stats import Hist
from sdfleet.simulate.trace import Generator, load_arrivals, read_trace


def queue(lease_s: float = 60, max_receives: int = 3) -> tuple[simpy.Environment, SimQueue]:
    env = simpy.Environment()
    return env, SimQueue(env, "q", 2, lease_s, max_receives)


def test_receive_takes_oldest_first_across_classes_and_splits_cohorts() -> None:
    _, q = queue()
    q.put(Cohort(0.0, 3, 0))
    q.put(Cohort(1.0, 2, 1))
    q.put(Cohort(2.0, 4, 0))
    got = q.take(4)
    assert [(c.t, c.n, c.cls) for c in got] == [(0.0, 3, 0), (1.0, 1, 1)]
    assert (q.visible, q.in_flight, q.visible_by_class) == (5, 4, [4, 1])
    assert q.metric(True) == 9 and q.metric(False) == 5


def test_release_is_visible_at_once_ahead_of_newer_and_counts_as_redelivery() -> None:
    _, q = queue()
    q.put(Cohort(0.0, 1, 0))
    q.put(Cohort(5.0, 1, 0))
    first = q.take(1)
    q.release(first)
    assert q.visible == 2 and q.in_flight == 0
    again = q.take(1)
    assert again[0].t == 0.0 and again[0].receives == 2 and q.redelivered == 1


def test_a_lost_delivery_comes_back_when_its_lease_runs_out() -> None:
    env, q = queue(lease_s=30)
    q.put(Cohort(0.0, 2, 1))
    q.lose(q.take(2))
    env.run(until=29.9)
    assert (q.visible, q.in_flight) == (0, 2)
    env.run(until=30.1)
    assert (q.visible, q.in_flight) == (2, 0)


def test_over_received_messages_go_to_the_dead_letter_queue() -> None:
    _, q = queue(max_receives=2)
    q.put(Cohort(0.0, 1, 0))
    for _ in range(2):
        q.release(q.take(1))
    assert q.take(1) == [] and q.dead == 1 and q.visible == 0 and q.in_flight == 0


def test_serial_finishing_holds_the_gpu_and_concurrent_finishing_overlaps() -> None:
    serial = Schedule(start=10, size=5, batch=2, run_full=1.0, run_last=0.6, finish_s=0.1, concurrency=0)
    assert serial.calls == 3 and serial.cycle(0) == pytest.approx(1.2)
    assert serial.end == pytest.approx(10 + 2 * 1.2 + 0.6 + 0.1)
    assert serial.finished(0) == pytest.approx(11.1) and serial.finished(1) == pytest.approx(11.2)
    assert serial.done_by(11.0) == 2 and serial.done_by(12.19) == 2 and serial.done_by(12.2) == 4
    staged = Schedule(start=0, size=8, batch=4, run_full=1.0, run_last=1.0, finish_s=0.1, concurrency=4)
    assert staged.end == pytest.approx(2.0) and staged.finished(7) == pytest.approx(2.1)
    slow = Schedule(start=0, size=8, batch=4, run_full=1.0, run_last=1.0, finish_s=2.0, concurrency=4)
    assert slow.cycle(0) == pytest.approx(2.0)  # finishing cannot keep up: 4 × 2 s / 4 slots


def test_histogram_percentiles_within_a_bin() -> None:
    h = Hist()
    values = np.random.default_rng(0).exponential(10.0, 20000)
    for v in values:
        h.add(float(v))
    for q in (0.5, 0.95, 0.99):
        assert h.quantile(q) == pytest.approx(float(np.quantile(values, q)), rel=0.02)
    h.add(100.0, weight=20000)  # one cohort of 20,000 requests
    assert h.quantile(0.6) == pytest.approx(100.0, rel=0.012)
    assert h.summary()["n"] == 40000


def test_trace_files_csv_and_jsonl(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text(
        "time,model,width,height,steps,tenant,count\n2.5,sd15,512,512,30,acme,3\n1,xl,1024,1024,20,bob,\n"
    )
    a = read_trace(csv, {"acme": "paid"})
    assert a.total == 4 and a.t.tolist() == [1.0, 2.5]
    assert [c.tier for c in a.classes] == ["paid", "standard"]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"time": 0, "model": "sd15", "tenant": "acme", "tier": "gold"}\n\n')
    assert read_trace(jsonl, {}).classes[0].tier == "gold"
    bad = tmp_path / "bad.csv"
    bad.write_text("time,model\nsoon,sd15\n")
    with pytest.raises(ConfigError, match=r"bad\.csv:2: time: Input should be a valid number"):
        read_trace(bad, {})


def test_generator_counts_and_binning_keep_every_request(tmp_path: Path) -> None:
    spec = tmp_path / "w.yaml"
    spec.write_text("duration_s: 600\nrate: 20\nbursts: [{at_s: 100, duration_s: 50, rate: 100}]\nseed: 3\n")
    exact, dt = load_arrivals(spec, {}, "auto")
    assert dt == 0 and exact.total == pytest.approx(600 * 20 + 50 * 100, rel=0.03)
    assert np.all(np.diff(exact.t) >= 0) and exact.n.max() == 1
    binned = exact.binned(10.0)
    assert binned.total == exact.total and len(binned.t) == 60
    gen = Generator.model_validate({"duration_s": 86400, "rate": 1000, "diurnal": {"peak_to_mean": 2}})
    assert gen.expected_total() == pytest.approx(86.4e6, rel=1e-6)
    day = gen.draw({}, 1.0)
    assert day.total == pytest.approx(86.4e6, rel=0.001) and len(day.t) <= 86400  # empty bins dropped


def test_gpu_table_interpolates_batches_and_scales_size_and_steps() -> None:
    t = PerfTable(DEFAULT_POINTS)
    assert t.seconds("h200", "sd15", 512, 512, 30, 1) == pytest.approx(0.78)
    assert t.seconds("h200", "sd15", 512, 512, 30, 2) == pytest.approx(0.78 + 0.15 / 3)
    assert t.seconds("h200", "sd15", 512, 512, 15, 4) == pytest.approx(0.93 / 2)
    assert t.seconds("a100", "sd15", 512, 512, 50, 16) == pytest.approx(50 / 3.04)
    assert t.seconds("a10g", "sd15", 512, 512, 50, 4) == pytest.approx(4 * 2.95)  # no batch figure: no gain
    assert t.seconds("a100", "sdxl", 1024, 1024, 50, 1) == pytest.approx(50 / 21.66 * 2.0 / 0.78)
    with pytest.raises(ConfigError, match="known: a100"):
        t.seconds("b200", "sd15", 512, 512, 30, 1)
    assert family_of("sd_xl_base_1.0.safetensors", {}) == "sdxl" and family_of("x", {"x": "sdxl"}) == "sdxl"


def test_bench_results_override_the_shipped_figures(tmp_path: Path) -> None:
    result = tmp_path / "runtime_speed.json"
    result.write_text(json.dumps({"steps": 30, "batch": 4, "rows": [{"size": 512, "s_per_image_mean": 0.2}]}))
    with pytest.raises(ConfigError, match="--perf-gpu"):
        load_points(result)
    t = PerfTable([*DEFAULT_POINTS, *load_points(result, gpu="h200")])
    assert t.seconds("h200", "sd15", 512, 512, 30, 4) == pytest.approx(0.8)
    custom = tmp_path / "points.yaml"
    point = PerfPoint(gpu="l40s", family="sd15", width=512, height=512, steps=30, batch=1, seconds=1.1)
    custom.write_text(json.dumps({"points": [point.model_dump()]}).replace('"', "'"))
    assert load_points(custom)[0] == point


def test_prices_default_and_from_a_file(tmp_path: Path) -> None:
    prices = load_prices(None)
    assert prices["a10g"].on_demand == pytest.approx(1.006)
    assert prices["a10g"].spot_price == pytest.approx(1.006 * SPOT_FRACTION)
    f = tmp_path / "prices.yaml"
    f.write_text("a10g: {on_demand: 1.2, spot: 0.4}\nb200: {on_demand: 9}\n")
    mine = load_prices(f)
    assert mine["a10g"].spot_price == 0.4 and mine["b200"].on_demand == 9
    with pytest.raises(ConfigError, match="--prices"):
        price_for(mine, "tpu")
    f.write_text("a10g: {on_demand: -1}\n")
    with pytest.raises(ConfigError, match="price file"):
        load_prices(f)


def test_params_merge_per_queue_and_refuse_unknown_fields(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(
        "keda: {cooldown_s: 120}\nqueues: {sd15: {keda: {min_replicas: 2}, agent: {max_batch: 4}}}\n"
    )
    p = load_params(f, {"nodes": {"gpu": "a10g"}})
    assert p.keda_for("sd15").min_replicas == 2 and p.keda_for("sd15").cooldown_s == 120
    assert p.keda_for("other").min_replicas is None and p.agent_for("sd15").max_batch == 4
    assert p.nodes.gpu == "a10g"
    f.write_text("keda: {cooldown: 120}\n")
    with pytest.raises(ConfigError, match="cooldown"):
        load_params(f)


def test_sweep_points_for_every_queue_or_one() -> None:
    from sdfleet.simulate.params import SimParams
    from sdfleet.simulate.sweep import Objective, points, with_point

    grid = {"keda.cooldown_s": [60, 300], "queues.sd15.keda.max_replicas": [4, 8], "nodes.gpu": ["a10g"]}
    assert len(points(grid)) == 4
    p = with_point(SimParams(), {"keda.cooldown_s": 300, "queues.sd15.keda.max_replicas": 8})
    assert p.keda_for("sd15").max_replicas == 8 and p.keda_for("other").max_replicas is None
    assert p.keda_for("other").cooldown_s == 300
    for bad in ("cooldown_s", "queues.sd15.max_replicas", "keda.nope"):
        with pytest.raises(ConfigError):
            with_point(SimParams(), {bad: 1})
    assert str(Objective.parse(" wait_p99 <= 30s")) == "wait p99 <= 30 s"


def test_unreadable_files_are_named_on_one_line(tmp_path: Path) -> None:
    """What ``sdfleet simulate`` says of a broken YAML file or workload is one line (``error: …``),
    with the place PyYAML found the problem, not PyYAML's drawing of it."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("keda: [\n  - cooldown_s: 1\n")
    with pytest.raises(ConfigError) as params:
        load_params(broken)
    assert str(params.value) == (
        f"cannot read simulation parameters {broken}: line 2, column 3: expected the node content, "
        "but found '-' (while parsing a flow node)"
    )
    with pytest.raises(ConfigError) as workload:
        load_arrivals(broken, {}, "auto")
    assert "\n" not in str(workload.value) and "line 2, column 3" in str(workload.value)
    bad_rate = tmp_path / "rate.yaml"
    bad_rate.write_text("rate: fast\n")  # pydantic's own text spans lines
    with pytest.raises(ConfigError) as invalid:
        load_arrivals(bad_rate, {}, "auto")
    assert str(invalid.value) == (
        f"workload {bad_rate}: duration_s: Field required; "
        "rate: Input should be a valid number, unable to parse string as a number (got 'fast')"
    )
