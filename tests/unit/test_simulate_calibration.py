"""The simulator against real agents: the small scenario of ``bench/simulate_calibration.py``.

Real processes on 127.0.0.1 (redis-server, ``sdfleet api``, ``sdfleet agent`` on the synthetic
runtime), scaled by the simulator's own KEDA/HPA rule; the simulated queue wait p50/p95 and
throughput must be within 15 % of the measured ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sdfleet.bench import load_scenario

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.timeout(240)
def test_simulated_queue_wait_and_throughput_within_15_percent_of_real_agents(tmp_path: Path) -> None:
    bench = load_scenario(BENCH, "simulate_calibration")
    report = bench.calibrate(bench.small_scenario(), workdir=tmp_path)
    assert report["tasks"] > 100 and report["agents_started"] >= 2
    for key in bench.COMPARED:
        assert abs(report["errors"][key]) <= 0.15, (key, report)
