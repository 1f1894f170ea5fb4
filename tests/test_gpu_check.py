"""benchmarks/gpu_check.py without a GPU: the no-GPU answer and the pure pieces its verdicts rest on.
(The checks themselves run with `python -m benchmarks.gpu_check --cpu-smoke`, minutes: not in the suite.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.gpu_check import compare_losses, logit_stats, logits_ok, mfu_summary, peak_tflops
from conftest import ROOT


def _run(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even where the suite runs on a GPU machine
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)


def test_no_gpu_says_so_and_exits_0():
    r = _run()
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["gpu"] is False and out["checks"] == {} and "--cpu-smoke" in out["skipped"]
    assert not os.path.exists(os.path.join(ROOT, "runs", "gpu_check", "gpu"))  # nothing was run


def test_unknown_check_is_a_one_line_error():
    r = _run("--checks", "zero4")
    assert r.returncode == 2 and "zero4" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                       ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("Tesla V100-SXM2-16GB", None)])
def test_peak_table_by_device_name(name, peak):
    assert peak_tflops(name)[0] == peak
    assert peak_tflops(name, 500.0) == (500.0, "--peak-tflops")  # the flag wins over the table


def test_loss_comparison_tolerances():
    ref = [10.0, 9.0, 8.0]
    assert compare_losses([10.0, 9.0, 8.0 + 5e-6], ref, "fp32")["ok"]
    assert not compare_losses([10.0, 9.0, 8.0 + 5e-5], ref, "fp32")["ok"]
    assert compare_losses([10.2, 9.0, 7.8], ref, "bf16")["ok"]  # 2.5% at most
    bad = compare_losses([10.0, 9.5, 8.0], ref, "bf16")
    assert not bad["ok"] and bad["max_rel_diff"] == pytest.approx(0.5 / 9.0)
    assert not compare_losses([10.0, 9.0], ref, "fp32")["ok"]  # a missing step is a failure


def test_logit_verdicts():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 100, generator=g)
    s = logit_stats(a + 1e-5, a)
    assert s["max_abs"] == pytest.approx(1e-5, rel=1e-2) and s["top1_agree"] == 1.0 and s["positions"] == 50
    assert logits_ok(s, "fp32")
    assert not logits_ok(logit_stats(a + 1e-3, a), "fp32")
    # bf16: the bound scales with the measured bf16 error of the reference path (floor 0.02)
    noisy = logit_stats(a + 0.05, a)
    assert logits_ok(noisy, "bf16", bf16_error=0.03) and not logits_ok(noisy, "bf16", bf16_error=0.001)
    assert not logits_ok(logit_stats(a[torch.randperm(50, generator=g)], a), "bf16", bf16_error=0.03)


def test_mfu_summary_leaves_out_the_first_interval():
    rows = [{"lora/tflops_per_process": 1.0, "lora/mfu": 0.001}] + [
        {"lora/tflops_per_process": t, "lora/mfu": t / 100} for t in (10.0, 12.0, 11.0)]
    out = mfu_summary(rows)
    assert out["intervals"] == 3 and out["tflops_per_process"] == 11.0 and out["mfu"] == pytest.approx(0.11)
