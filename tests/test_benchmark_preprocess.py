"""Smoke test of the preprocessing benchmark: it runs end to end and reports every number (no targets)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = (
    "floor_mol_per_s", "pipeline_mol_per_s", "cost_ratio_to_floor", "n_molecules_ratio",
    "ray_speedup_2_workers", "mol_per_s_1_worker", "mol_per_s_2_workers",
    "peak_rss_mb_driver_200k", "peak_rss_mb_driver_20k", "driver_rss_ratio_200k_over_20k",
)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a few minutes on a busy 2-core machine
def test_benchmark_quick_reports_all_numbers():
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.preprocess", "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in KEYS:
        assert isinstance(result[key], (int, float)) and result[key] > 0, (key, result.get(key))
    assert result["targets"] and result["machine"]["cpu_count"] >= 1
