"""`python -m benchmarks.gpu_check`: what the CPU tests cannot check, in one run of a few minutes on a GPU machine.

Every piece goes through the project's own code paths:
  data        the shipped forward-prediction samples, converted and preprocessed (trainer.dataset.tasks.prepare)
  logits      stage 2's model (trainer.stages.multimodal.build_model, LoRA on, random encoder and projector)
              in the run's dtype: one packed micro-batch under each attention kernel against every sample
              run alone (plain SDPA, one sample per row; benchmarks/train_step.py's comparison), and the
              kernels against each other on the packed rows. bf16: also the bf16 error itself (the same
              model cast to fp32, samples alone), which sets the bound (see TOLERANCES)
  stage2_K    `accelerate launch --config_file launch_configs/accelerate/single_gpu.yaml trainer/run.py` for
              the lora stage with attention kernel K (flash_attention_2 when flash_attn is installed,
              sdpa_varlen), bf16; losses of the kernels against each other
  ddp         launch_configs/accelerate/multi_gpu_1node.yaml with every GPU (skipped with one GPU)
  zero2/zero3 gpu_8_zero2.yaml / gpu_8_zero3.yaml (ds_configs/zero{2,3}.json as shipped) with
              `--num_processes torch.cuda.device_count()`, NCCL; per-step losses against the single-process
              run with `grad_accum` = processes (the same global batch), plus the stage's own guards
              (frozen parameters unchanged, every trained tensor moved, identical ranks)
  mfu         the training loop's own TFLOP/s per process (trainer.loop, flops_per_token of
              trainer/stages/multimodal.py, from metrics.jsonl) over the GPU's dense bf16 peak: PEAK_TFLOPS by
              `torch.cuda.get_device_name()`, or `--peak-tflops`
Each check runs in its own try block under its own time limit (and a global one, `--budget-s`); its
results, or its error text, go into the JSON line. Launch logs: OUT_DIR/NAME.log.

Without a GPU it prints `{"gpu": false, ...}` and exits 0. `--cpu-smoke` runs the same code on a CPU
machine (fp32, tiny random LLaMA, sdpa_varlen vs sdpa / eager, DDP and ZeRO-2 / ZeRO-3 over gloo with 2
processes: launch_configs/accelerate/cpu_2proc*.yaml, ZeRO-3 persistence thresholds 0 so the tiny model is
partitioned), so the logic is tested where no GPU is. Exit code 0 when every check passed, 1 otherwise.
Last stdout line: one JSON object; progress on stderr. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCEL = os.path.join(ROOT, "launch_configs", "accelerate")

# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor datasheets, without sparsity). First substring of
# `torch.cuda.get_device_name()` that matches wins, so the more specific names come first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
               ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
               ("L40", 181.0), ("L4", 121.0))

# fp32: packed rows against separate samples as benchmarks/train_step.py (1e-4), losses as tests/test_llm_stages.py.
# bf16 (8 mantissa bits): two bf16 computations of the same logits differ by about as much as each differs
# from the fp32 one, so a kernel passes when its mean |difference| is within 3x the measured bf16 error of
# the reference path (floor 0.02) and top-1 tokens agree at 95% of positions; a real bug (attention across
# samples, shifted positions) moves logits by whole units. Training losses: within 3% relative per step
# (DeepSpeed keeps bf16 weights with fp32 masters, the single-process run autocasts: roundings differ).
TOLERANCES = {
    "fp32": {"logits_max_abs": 1e-4, "loss_abs": 1e-5, "loss_rel": 0.0},
    "bf16": {"logits_mean_abs_over_bf16_error": 3.0, "logits_mean_abs_floor": 0.02, "logits_top1_agree_min": 0.95,
             "loss_abs": 0.0, "loss_rel": 0.03},
}


CHECKS = ("logits", "stage2_flash_attention_2", "stage2_sdpa_varlen", "stage2_sdpa", "ddp", "zero2", "zero3", "mfu")


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_tflops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, where it came from) for a CUDA device name."""
    if override:
        return float(override), "--peak-tflops"
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value, f"table: {key}"
    return None, "unknown GPU: pass --peak-tflops"


@dataclasses.dataclass
class Plan:
    """What one mode runs: GPU (bf16, SmolLM2, NCCL) or the CPU smoke test (fp32, tiny LLaMA, gloo)."""
    gpu: bool
    world: int  # processes of the distributed runs
    llm: str
    dtype: str
    mixed_precision: str
    kernels: list[str]  # logits: packed rows under each
    train_kernels: list[str]  # one single-process stage-2 run each
    budget: int  # tokens per packed row
    rows: int  # packed rows per micro-batch
    steps: int
    log_every: int
    lr: float
    warmup: int
    lora: dict
    encoder: dict | None
    data_limit: int | None
    single_launch: str | None  # None: plain `python trainer/run.py`
    ddp_launch: str
    zero_launch: dict
    zero3_overrides: dict
    peak: float | None = None
    reference: str = "sdpa"  # separate samples, one per row
    primary: str = "sdpa_varlen"  # the kernel of the distributed runs (the recipes' default)

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype == "bfloat16" else "fp32"


def make_plan(cpu_smoke: bool, world: int, llm: str | None, steps: int | None, peak: float | None,
              flash: bool) -> Plan:
    if cpu_smoke:
        return Plan(gpu=False, world=2, llm=llm or "tiny-random", dtype="float32", mixed_precision="no",
                    kernels=["sdpa_varlen", "sdpa", "eager"], train_kernels=["sdpa_varlen", "sdpa"], budget=1024,
                    rows=1, steps=steps or 4, log_every=1, lr=3e-3, warmup=0,
                    lora={"r": 4, "alpha": 8, "dropout": 0.0}, encoder={"num_layers": 2, "hidden": 32},
                    data_limit=160, single_launch=None, ddp_launch="cpu_2proc.yaml",
                    zero_launch={2: "cpu_2proc_zero2.yaml", 3: "cpu_2proc_zero3.yaml"},
                    zero3_overrides={"stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0},
                    peak=peak)
    kernels = (["flash_attention_2"] if flash else []) + ["sdpa_varlen"]
    return Plan(gpu=True, world=world, llm=llm or "smollm2-135m", dtype="bfloat16", mixed_precision="bf16",
                kernels=kernels + ["sdpa"], train_kernels=kernels, budget=2048, rows=4, steps=steps or 40, log_every=10,
                lr=2e-4, warmup=5, lora={"r": 64, "alpha": 16, "dropout": 0.05}, encoder=None, data_limit=None,
                single_launch="single_gpu.yaml", ddp_launch="multi_gpu_1node.yaml",
                zero_launch={2: "gpu_8_zero2.yaml", 3: "gpu_8_zero3.yaml"}, zero3_overrides={}, peak=peak)


def lora_section(plan: Plan, data: str, attn: str, grad_accum: int) -> dict:
    """The recipe's `lora` section (also what the logits check builds its model from)."""
    section = {"data": [data], "llm": {"name": plan.llm, "attn_implementation": attn, "dtype": plan.dtype},
               "batching": {"budget": plan.budget, "rows": plan.rows}, "prompt": {"max_length": plan.budget},
               "lora": dict(plan.lora), "peak_tflops": float(plan.peak or 0.0),
               "train": {"max_steps": plan.steps, "log_every": plan.log_every, "lr": plan.lr,
                         "warmup_steps": plan.warmup, "grad_accum": grad_accum}}
    if plan.encoder:
        section["encoder"] = dict(plan.encoder)
    return section


def recipe(plan: Plan, data: str, run_dir: str, attn: str, grad_accum: int) -> dict:
    return {"run_dir": run_dir, "seed": 0, "log_with": "none", "mixed_precision": plan.mixed_precision,
            "stages": ["lora"], "lora": lora_section(plan, data, attn, grad_accum)}


# -- comparisons (pure) ------------------------------------------------------------------------------------
def logit_stats(a, b) -> dict:
    """Differences of two [positions, vocab] logit tensors."""
    d = (a.float() - b.float()).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()), "positions": int(a.shape[0])}


def logits_ok(stats: dict, precision: str, bf16_error: float | None = None) -> bool:
    tol = TOLERANCES[precision]
    if precision == "fp32":
        return stats["max_abs"] <= tol["logits_max_abs"]
    bound = max(tol["logits_mean_abs_floor"], tol["logits_mean_abs_over_bf16_error"] * (bf16_error or 0.0))
    return stats["mean_abs"] <= bound and stats["top1_agree"] >= tol["logits_top1_agree_min"]


def compare_losses(losses: list[float], reference: list[float], precision: str) -> dict:
    """Per-step losses against a reference run: |a - b| <= loss_abs + loss_rel * |b| at every step."""
    tol = TOLERANCES[precision]
    if not losses or len(losses) != len(reference):
        return {"ok": False, "why": f"{len(losses)} logged steps against {len(reference)} in the reference"}
    diffs = [abs(a - b) for a, b in zip(losses, reference)]
    ok = all(d <= tol["loss_abs"] + tol["loss_rel"] * abs(b) for d, b in zip(diffs, reference))
    return {"ok": ok, "max_abs_diff": max(diffs), "max_rel_diff": max(d / max(abs(b), 1e-12) for d, b in zip(diffs, reference))}


def mfu_summary(rows: list[dict], stage: str = "lora") -> dict:
    """Median TFLOP/s per process and MFU over the logged intervals after the first (warm-up, allocator)."""
    steady = rows[1:] or rows
    out = {"intervals": len(steady)}
    for key in ("tflops_per_process", "mfu", "tokens_per_s"):
        vals = [r[f"{stage}/{key}"] for r in steady if f"{stage}/{key}" in r]
        if vals:
            out[key] = statistics.median(vals)
    return out


# -- running the checks ------------------------------------------------------------------------------------
class Deadline:
    def __init__(self, seconds: float, scale: float = 1.0):
        self.end = time.time() + seconds
        self.scale = scale  # per-check limits are sized for a GPU machine; 2 shared CPU cores need more

    def left(self) -> float:
        return self.end - time.time()


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in this (main) thread after `seconds`: the limit of an in-process check."""
    def fire(signum, frame):
        raise TimeoutError(f"over its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_check(results: dict, name: str, limit_s: float, deadline: Deadline, fn, *args):
    """results[name] = fn(seconds allowed, *args) with "ok", or the error; returns fn's result or None."""
    allowed = min(limit_s * deadline.scale, deadline.left())
    if allowed < 10:
        results[name] = {"ok": False, "skipped": "the global time budget is spent"}
        return None
    log(f"{name}: start (limit {allowed:.0f} s)")
    t0 = time.time()
    try:
        out = fn(allowed, *args)
        results[name] = {"ok": bool(out.get("ok", True)), **{k: v for k, v in out.items() if k != "ok"}}
    except Exception as e:  # one check's failure must not stop the others: its text goes into the JSON
        out = None
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[-3000:]}
    results[name]["elapsed_s"] = round(time.time() - t0, 1)
    log(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['elapsed_s']} s)")
    return out


def child_env(plan: Plan) -> dict:
    from benchmarks.zero_memory import child_env as base

    env = base(default_malloc=True)  # ACCELERATE_USE_CPU removed, the venv's bin first, offline hub
    env["DS_ACCELERATOR"] = "cuda" if plan.gpu else "cpu"  # the Makefile's cpu default must not reach GPU ranks
    if not plan.gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke test stays on CPU on a GPU machine too
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def launch(plan: Plan, out_dir: str, name: str, data: str, attn: str, grad_accum: int, limit_s: float,
           launch_file: str | None, num_processes: int | None = None, ds_file: str | None = None) -> dict:
    """One `accelerate launch ... trainer/run.py` (or plain `python trainer/run.py`) of a fresh run folder;
    returns its summary.json and per-step losses / metrics from metrics.jsonl."""
    import yaml

    from benchmarks.zero_memory import free_port

    run_dir = os.path.join(out_dir, name)
    shutil.rmtree(run_dir, ignore_errors=True)  # an old checkpoint there would be resumed
    os.makedirs(run_dir)
    path = os.path.join(run_dir, "recipe.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe(plan, data, os.path.join(run_dir, "run"), attn, grad_accum), f)
    if launch_file is None:
        cmd = [sys.executable, os.path.join(ROOT, "trainer", "run.py")]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ACCEL, launch_file),
               "--main_process_port", str(free_port())]
        cmd += ["--num_processes", str(num_processes)] if num_processes else []
        cmd += ["--deepspeed_config_file", ds_file] if ds_file else []
        cmd += [os.path.join(ROOT, "trainer", "run.py")]
    cmd += ["--config", path]
    log_path = os.path.join(out_dir, f"{name}.log")
    with open(log_path, "w") as logf:
        # own session: on timeout the launcher and every rank it started go down together
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(plan), stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"over its {limit_s:.0f} s limit; log {log_path}: {tail(log_path)}") from None
    if rc != 0:
        raise RuntimeError(f"exit code {rc}; log {log_path}: {tail(log_path)}")
    with open(os.path.join(run_dir, "run", "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "run", "lora", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"summary": summary, "rows": rows, "losses": [r["lora/loss"] for r in rows], "log": log_path}


def tail(path: str, chars: int = 1500) -> str:
    with open(path, errors="replace") as f:
        text = f.read()
    noise = ("%|", "Warning:", "warnings.warn(", "return func(", "*****")  # tqdm bars, library warnings
    lines = [ln for ln in text.splitlines() if ln.strip() and not any(n in ln for n in noise)]
    return "\n".join(lines)[-chars:]


def stage_guards(stage: dict) -> dict:
    """The stage's own checks, as trainer/stages/multimodal.py reports them."""
    return {"frozen_params_unchanged": stage.get("frozen_params_unchanged"),
            "trained_tensors": stage.get("trained_tensors"), "trained_tensors_changed": stage.get("trained_tensors_changed"),
            "ranks_identical": stage.get("ranks_identical"),
            "export_max_abs_logit_diff": stage.get("export_max_abs_logit_diff")}


def guards_ok(g: dict) -> bool:
    return bool(g["frozen_params_unchanged"] and g["ranks_identical"] and g["trained_tensors"]
                and g["trained_tensors_changed"] == g["trained_tensors"])


# -- the checks --------------------------------------------------------------------------------------------
def check_env(_allowed, plan: Plan, peak_source: str) -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "processes": plan.world, "precision": plan.precision,
           "llm": plan.llm, "kernels": plan.kernels, "train_kernels": plan.train_kernels,
           "peak_tflops": plan.peak, "peak_source": peak_source}
    if plan.gpu:
        out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    for pkg in ("flash_attn", "deepspeed", "accelerate", "transformers", "peft"):
        spec = importlib.util.find_spec(pkg)
        if spec is None:
            out[pkg] = None
        else:
            from importlib.metadata import PackageNotFoundError, version

            try:
                out[pkg] = version(pkg.replace("_", "-"))
            except PackageNotFoundError:
                out[pkg] = "installed"
    return out


def check_data(allowed, plan: Plan, data_root: str, data: str | None) -> dict:
    """The instruction folder, and the LLM's local folder built once here (not by every rank at once)."""
    from trainer.models.llm import llm_path
    from trainer.dataset.tasks import SHIPPED, prepare

    with time_limit(allowed):
        if data is None:
            name = f"forward_{plan.data_limit or 'all'}"
            data = prepare("forward", os.path.join(ROOT, SHIPPED["forward"][0]), data_root, name=name, limit=plan.data_limit)
        llm_folder = llm_path(plan.llm)
    with open(os.path.join(data, "manifest.json")) as f:
        manifest = json.load(f)
    return {"ok": manifest.get("accepted", 0) > 0, "folder": data, "accepted": manifest.get("accepted"),
            "llm_folder": llm_folder}


def check_logits(allowed, plan: Plan, data: str, work: str) -> dict:
    import numpy as np
    import torch
    from accelerate.utils import send_to_device

    from benchmarks.train_step import set_attention
    from trainer.dataset.collator import Collator, plan_batches
    from trainer.config import from_dict
    from trainer.dataset.instructions import InstructionDataset
    from trainer.models.llm import load_tokenizer
    from trainer.stages import lora
    from trainer.stages.multimodal import build_model

    with time_limit(allowed):
        cfg = from_dict(lora.Config, lora_section(plan, data, plan.reference, 1), "lora")
        lora.validate(cfg)
        tok = load_tokenizer(cfg.llm.name)
        ds = InstructionDataset(data, tok, reduction=cfg.projector.reduction, levels=cfg.projector.levels, prompt=cfg.prompt)
        os.makedirs(work, exist_ok=True)
        model, _ = build_model(cfg, work, "lora", tok, seed=0)
        device = torch.device("cuda", 0) if plan.gpu else torch.device("cpu")
        model.to(device).eval()
        # two packed rows of several samples each (the first multi-sample bins of the training plan)
        bins = [b for b in plan_batches(ds.lengths, "packed", 0, 0, budget=plan.budget) if len(b) > 1][:2]
        items = [ds[i] for b in bins for i in b]
        packed = send_to_device(Collator(tok.pad_token_id, budget=plan.budget)(items), device)
        single = Collator(tok.pad_token_id, packed=False)

        @torch.no_grad()
        def separate(kernel: str) -> torch.Tensor:  # every sample alone, its real positions, concatenated
            set_attention(model, kernel)
            return torch.cat([model.logits(send_to_device(single([it]), device))[0, :len(it["input_ids"])]
                              for it in items])

        @torch.no_grad()
        def packed_logits(kernel: str) -> torch.Tensor:
            set_attention(model, kernel)
            full = model.logits(packed)
            return torch.cat([full[r, at:at + n] for r, at, n, _ in packed["spans"]])

        ref = separate(plan.reference)
        got, out, errors = {}, {"samples": len(items), "rows": int(packed["input_ids"].shape[0]),
                                "tokens": int(packed["real_tokens"]), "reference": f"{plan.reference}, samples alone"}, {}
        for k in plan.kernels:
            try:
                got[k] = packed_logits(k)
            except Exception as e:  # e.g. flash_attention_2 refusing this build: the other kernels still run
                errors[k] = f"{type(e).__name__}: {e}"[-1500:]
        bf16_error = None
        if plan.precision == "bf16":  # the bf16 error of the reference path: same weights, computed in fp32
            model.to(torch.float32)
            exact = separate(plan.reference)
            base = logit_stats(ref, exact)
            bf16_error = base["mean_abs"]
            out["bf16_vs_fp32_reference"] = base
        vs_sep = {k: {**logit_stats(v, ref)} for k, v in got.items()}
        for s in vs_sep.values():
            s["ok"] = logits_ok(s, plan.precision, bf16_error)
        names = list(got)
        pairs = {f"{a}_vs_{b}": logit_stats(got[a], got[b]) for i, a in enumerate(names) for b in names[i + 1:]}
        for s in pairs.values():
            s["ok"] = logits_ok(s, plan.precision, bf16_error)
        out.update(packed_vs_separate=vs_sep, kernels_vs_each_other=pairs, kernel_errors=errors,
                   lengths=[int(np.asarray(it["input_ids"]).shape[0]) for it in items])
        out["ok"] = (not errors and len(got) == len(plan.kernels)
                     and all(s["ok"] for s in list(vs_sep.values()) + list(pairs.values())))
        del model
        if plan.gpu:
            torch.cuda.empty_cache()  # the launches that follow get the whole GPU
    return out


def check_stage2(allowed, plan: Plan, out_dir: str, data: str, kernel: str, runs: dict) -> dict:
    r = launch(plan, out_dir, f"stage2_{kernel}", data, kernel, plan.world, allowed, plan.single_launch)
    runs[kernel] = r
    stage = r["summary"]["stages"]["lora"]
    g = stage_guards(stage)
    out = {"num_processes": r["summary"]["num_processes"], "distributed_type": r["summary"]["distributed_type"],
           "losses": r["losses"], "grad_accum": plan.world, "flops_per_token": stage.get("flops_per_token"),
           **g, **mfu_summary(r["rows"]), "log": r["log"]}
    out["ok"] = guards_ok(g) and r["summary"]["num_processes"] == 1
    first = plan.train_kernels[0]
    if kernel != first and first in runs:
        out[f"losses_vs_{first}"] = compare_losses(r["losses"], runs[first]["losses"], plan.precision)
        out["ok"] = out["ok"] and out[f"losses_vs_{first}"]["ok"]
    return out


def check_distributed(allowed, plan: Plan, out_dir: str, data: str, kind: str, runs: dict) -> dict:
    """DDP or ZeRO-2 / ZeRO-3 with plan.world processes against the single-process run."""
    ds_file = None
    if kind == "ddp":
        launch_file = plan.ddp_launch
    else:
        stage = int(kind[-1])
        launch_file = plan.zero_launch[stage]
        if stage == 3 and plan.zero3_overrides:  # a copy of ds_configs/zero3.json on the command line
            with open(os.path.join(ROOT, "ds_configs", "zero3.json")) as f:
                ds = json.load(f)
            ds["zero_optimization"].update(plan.zero3_overrides)
            ds_file = os.path.join(out_dir, "zero3_check.json")
            with open(ds_file, "w") as f:
                json.dump(ds, f, indent=1)
    r = launch(plan, out_dir, kind, data, plan.primary, 1, allowed, launch_file, plan.world, ds_file)
    s = r["summary"]
    g = stage_guards(s["stages"]["lora"])
    # DDP without a GPU runs as MULTI_CPU (cpu_2proc.yaml: MULTI_GPU + use_cpu, see make_accelerator)
    ddp_type = "DistributedType.MULTI_GPU" if plan.gpu else "DistributedType.MULTI_CPU"
    expected = "DistributedType.DEEPSPEED" if kind.startswith("zero") else ddp_type
    out = {"launch_file": launch_file, "ds_config": ds_file or (f"ds_configs/{kind}.json" if kind != "ddp" else None),
           "num_processes": s["num_processes"], "distributed_type": s["distributed_type"], "losses": r["losses"], **g,
           **mfu_summary(r["rows"]), "log": r["log"]}
    out["ok"] = guards_ok(g) and s["num_processes"] == plan.world and s["distributed_type"] == expected
    ref = runs.get(plan.primary)
    if ref is None:
        out["ok"], out["losses_vs_single"] = False, {"ok": False, "why": f"no single-process {plan.primary} run"}
    else:
        out["losses_vs_single"] = compare_losses(r["losses"], ref["losses"], plan.precision)
        out["ok"] = out["ok"] and out["losses_vs_single"]["ok"]
    return out


def check_mfu(_allowed, plan: Plan, runs: dict) -> dict:
    """MFU of each single-process stage-2 run, from the loop's own metrics (needs a known peak)."""
    if not runs:
        return {"ok": False, "why": "no stage-2 run finished"}
    out = {"peak_tflops": plan.peak, **{k: mfu_summary(r["rows"]) for k, r in runs.items()}}
    if not plan.peak:
        out.update(ok=not plan.gpu, why="peak unknown: pass --peak-tflops")
        return out
    vals = [v.get("mfu") for k, v in out.items() if isinstance(v, dict)]
    out["ok"] = all(m is not None and 0.0 < m < 1.0 for m in vals)  # > 1 would mean a wrong FLOP count
    return out


# -- main --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="the same checks on CPU: fp32, tiny LLaMA, gloo, 2 processes")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak per GPU (default: PEAK_TFLOPS)")
    p.add_argument("--llm", default=None, help="LLM name or folder (default smollm2-135m; --cpu-smoke: tiny-random)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training run (GPU 40, smoke 4)")
    p.add_argument("--data", default=None, help="a preprocessed instruction folder (default: the shipped forward samples)")
    p.add_argument("--out-dir", default=None, help="default runs/gpu_check/{gpu,cpu_smoke}")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time for all checks together (default 460; --cpu-smoke 1800: 2 shared cores)")
    p.add_argument("--checks", default=None, help=f"comma-separated subset of {', '.join(CHECKS)} (env and data "
                   "always run; ddp / zero need stage2_sdpa_varlen as their reference)")
    a = p.parse_args(argv)
    t_start = time.time()
    wanted = set(CHECKS) if a.checks is None else set(a.checks.split(","))
    if wanted - set(CHECKS):
        print(f"--checks: unknown {sorted(wanted - set(CHECKS))}; known: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    if a.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not a.cpu_smoke:
        print(json.dumps({"gpu": False, "mode": "none", "skipped": "no CUDA device is visible: nothing to check "
                          "(python -m benchmarks.gpu_check --cpu-smoke runs the same code on CPU)", "checks": {}}))
        return 0
    if gpu:
        name = torch.cuda.get_device_name(0)
        peak, peak_source = peak_tflops(name, a.peak_tflops)
    else:
        name, peak, peak_source = "cpu", a.peak_tflops, "--peak-tflops" if a.peak_tflops else "none (CPU)"
    flash = importlib.util.find_spec("flash_attn") is not None
    plan = make_plan(a.cpu_smoke, torch.cuda.device_count() if gpu else 2, a.llm, a.steps, peak, flash)
    mode = "cpu_smoke" if a.cpu_smoke else "gpu"
    out_dir = os.path.abspath(a.out_dir or os.path.join(ROOT, "runs", "gpu_check", mode))
    os.makedirs(out_dir, exist_ok=True)
    deadline = Deadline(a.budget_s or (1800.0 if a.cpu_smoke else 460.0), 2.5 if a.cpu_smoke else 1.0)
    results: dict = {}
    runs: dict = {}
    log(f"{mode}: {name}, {plan.world} processes, {plan.precision}, kernels {plan.kernels}; logs under {out_dir}")
    run_check(results, "env", 30, deadline, check_env, plan, peak_source)
    if not flash and plan.gpu:
        results["flash_attention_2"] = {"ok": True, "skipped": "flash_attn is not installed"}
    d = run_check(results, "data", 180, deadline, check_data, plan, os.path.join(ROOT, "runs", "gpu_check", "data"), a.data)
    data = d["folder"] if d else None
    if data and "logits" in wanted:
        run_check(results, "logits", 150, deadline, check_logits, plan, data, os.path.join(out_dir, "logits"))
    for k in plan.train_kernels if data else []:
        if f"stage2_{k}" in wanted or (k == plan.primary and wanted & {"ddp", "zero2", "zero3"}):
            run_check(results, f"stage2_{k}", 150, deadline, check_stage2, plan, out_dir, data, k, runs)
    if data and "ddp" in wanted:
        if plan.world >= 2:
            run_check(results, "ddp", 150, deadline, check_distributed, plan, out_dir, data, "ddp", runs)
        else:
            results["ddp"] = {"ok": True, "skipped": "one GPU: DDP needs two or more"}
    for kind in ("zero2", "zero3"):
        if data and kind in wanted:
            run_check(results, kind, 180, deadline, check_distributed, plan, out_dir, data, kind, runs)
    if data and "mfu" in wanted:
        run_check(results, "mfu", 30, deadline, check_mfu, plan, runs)
    failed = [k for k, v in results.items() if not v.get("ok")]
    summary = {"gpu": gpu, "mode": mode, "device": name, "processes": plan.world, "precision": plan.precision,
               "peak_tflops": peak, "all_ok": not failed, "failed": failed, "checks": results,
               "tolerances": TOLERANCES[plan.precision], "out_dir": out_dir, "wall_s": round(time.time() - t_start, 1)}
    print(json.dumps(summary))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
