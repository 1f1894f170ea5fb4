"""The training loop every stage runs: accumulation, logging, evaluation, checkpoint and exact resume.

A stage hands over its prepared model/optimizer/loader and a `step_fn(model, batch, generator) ->
(loss, metrics)`. Randomness inside a step (masking, negative sampling) comes from `generator`,
seeded from (seed, micro-step, rank), so a resumed run draws exactly what the uninterrupted one drew.

Checkpoints: `accelerator.save_state` into `checkpoints/step-N.tmp`, renamed to `step-N` once every
rank has written (a crash never leaves a half checkpoint that looks whole), plus `trainer_state.json`
(step, epoch, batches consumed in the epoch) so resume restarts at the same batch.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Callable

import torch
from tqdm import tqdm

from .config import TrainConfig

STATE_FILE = "trainer_state.json"


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 10% (a sane default for every stage)."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def latest_checkpoint(ckpt_dir: str) -> str | None:
    if not os.path.isdir(ckpt_dir):
        return None
    done = [d for d in os.listdir(ckpt_dir) if d.startswith("step-") and not d.endswith(".tmp")
            and os.path.exists(os.path.join(ckpt_dir, d, STATE_FILE))]
    return os.path.join(ckpt_dir, max(done, key=lambda d: int(d[5:]))) if done else None


def save_checkpoint(accelerator, ckpt_dir: str, state: dict, keep: int,
                    snapshot: Callable[[str], None] | None = None) -> str:
    """`snapshot(tmp_folder)` (every rank) adds files inside the checkpoint before it is renamed whole."""
    final = os.path.join(ckpt_dir, f"step-{state['step']}")
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)  # every rank writes its part (DeepSpeed shards)
    if snapshot:
        snapshot(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        old = sorted((d for d in os.listdir(ckpt_dir) if d.startswith("step-") and not d.endswith(".tmp")),
                     key=lambda d: int(d[5:]))
        for d in old[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def prepare_training(accelerator, model, optimizer, scheduler, loader=None, grad_accum: int = 1):
    """Accelerate / DeepSpeed wrapping. The scheduler is NOT prepared: a prepared one steps once per process
    per optimizer step (accelerate counts samples), which would run our per-step schedule `world` times too
    fast; it is registered for checkpointing instead and the loop steps it once per optimizer step."""
    accelerator.gradient_accumulation_steps = grad_accum
    objs = accelerator.prepare(model, optimizer, *([loader] if loader is not None else []))
    accelerator.register_for_checkpointing(scheduler)
    return objs


def train(accelerator, model, optimizer, scheduler, loader, step_fn, cfg: TrainConfig, ckpt_dir: str,
          seed: int = 0, evaluate: Callable[[], dict] | None = None, name: str = "train",
          count_fn: Callable | None = None, on_epoch: Callable[[int], None] | None = None,
          flops_per_token: float = 0.0, peak_flops: float = 0.0,
          snapshot: Callable[[str], None] | None = None) -> dict:
    """Run optimizer steps until cfg.max_steps; returns the last logged and evaluated metrics.

    Micro-batches are taken in windows of `cfg.grad_accum` (one optimizer step each; a last partial
    window of an epoch is skipped). `step_fn(model, batch, generator[, denominator]) -> (loss, metrics)`;
    metrics may hold "samples" and "tokens" (this micro-batch's counts) for throughput.

    Token-normalised stages pass `count_fn(batch) -> label tokens`: the window's count is summed over
    ranks first, and step_fn gets `denominator` = that count / (ranks x grad_accum), so the gradient
    is the mean over every label token of the global batch however it is split across micro-steps
    and ranks (DDP and DeepSpeed average over ranks, accumulation divides by grad_accum). step_fn then
    returns metrics "loss_sum" (summed token loss) and the logged loss is the global per-token mean.
    `on_epoch(epoch)` reshuffles a sampler that lives outside Accelerate. With `flops_per_token`, the
    log has achieved TFLOP/s per process and, given `peak_flops` per process, MFU. `snapshot(folder)`
    writes a loadable copy of the model into every checkpoint (see save_checkpoint).
    """
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "micro": 0}
    resume = latest_checkpoint(ckpt_dir)
    if resume:
        accelerator.load_state(resume)
        with open(os.path.join(resume, STATE_FILE)) as f:
            state = json.load(f)
        accelerator.print(f"[{name}] resumed from {resume} (step {state['step']})")
    rank, world, start = accelerator.process_index, accelerator.num_processes, state["step"]
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc=name, disable=not accelerator.is_local_main_process)
    metrics_file = os.path.join(os.path.dirname(ckpt_dir), "metrics.jsonl")  # one line per logged step
    os.makedirs(ckpt_dir, exist_ok=True)
    last: dict = {}
    sums: dict[str, float] = {}
    count, t0, samples, tokens = 0, time.time(), 0, 0
    model.train()
    while state["step"] < cfg.max_steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state["epoch"])
        if on_epoch:
            on_epoch(state["epoch"])
        epoch_loader = accelerator.skip_first_batches(loader, state["batches_in_epoch"]) if state["batches_in_epoch"] else loader
        window: list = []
        for batch in epoch_loader:
            window.append(batch)
            if len(window) < cfg.grad_accum:
                continue
            extra = ()
            if count_fn:
                n_global = accelerator.reduce(torch.tensor(float(sum(count_fn(b) for b in window)),
                                                           device=accelerator.device), "sum")
                extra = (n_global / (world * cfg.grad_accum),)
            step_sums: dict[str, float] = {}
            for b in window:
                gen = torch.Generator().manual_seed((seed * 1_000_003 + state["micro"]) * world + rank)
                with accelerator.accumulate(model):
                    loss, metrics = step_fn(model, b, gen, *extra)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:  # once per optimizer step (see prepare_training)
                        scheduler.step()
                    optimizer.zero_grad()
                state["batches_in_epoch"] += 1
                state["micro"] += 1
                samples += metrics.pop("samples", 0)
                tokens += metrics.pop("tokens", 0)
                row = metrics if count_fn else {"loss": loss.detach().float().item(), **metrics}
                for k, v in row.items():
                    step_sums[k] = step_sums.get(k, 0.0) + float(v)
            window = []
            if count_fn:  # the global per-token loss of this optimizer step (the same on every rank)
                total = accelerator.reduce(torch.tensor(step_sums.pop("loss_sum"), device=accelerator.device), "sum")
                step_sums = {"loss": float(total / n_global), **{k: v / cfg.grad_accum for k, v in step_sums.items()}}
            else:
                step_sums = {k: v / cfg.grad_accum for k, v in step_sums.items()}
            for k, v in step_sums.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            state["step"] += 1
            bar.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] == cfg.max_steps:
                dt = max(1e-9, time.time() - t0)
                last = {f"{name}/{k}": v / count for k, v in sums.items()}
                last[f"{name}/lr"] = scheduler.get_last_lr()[0]
                last[f"{name}/samples_per_s"] = samples * world / dt
                if tokens:
                    last[f"{name}/tokens_per_s"] = tokens * world / dt
                if tokens and flops_per_token:
                    achieved = tokens * flops_per_token / dt  # per process
                    last[f"{name}/tflops_per_process"] = achieved / 1e12
                    if peak_flops:
                        last[f"{name}/mfu"] = achieved / peak_flops
                accelerator.log(last, step=state["step"])
                if accelerator.is_main_process:
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps({"step": state["step"], **last}) + "\n")
                bar.set_postfix(loss=f"{last[f'{name}/loss']:.4f}")
                sums, count, t0, samples, tokens = {}, 0, time.time(), 0, 0
            if evaluate and cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < cfg.max_steps:
                accelerator.log({f"{name}/eval/{k}": v for k, v in evaluate().items()}, step=state["step"])
                model.train()
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                save_checkpoint(accelerator, ckpt_dir, state, cfg.keep_checkpoints, snapshot)
                if os.environ.get("M3MOL_CRASH_AFTER_STEP") == str(state["step"]):
                    os._exit(17)  # test hook: die like a killed job, right after a checkpoint
            if state["step"] >= cfg.max_steps:
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
    bar.close()
    if not (resume and state["step"] == start):  # a run resumed at its end has its last checkpoint already
        save_checkpoint(accelerator, ckpt_dir, state, cfg.keep_checkpoints, snapshot)
    out = {k.split("/", 1)[1]: v for k, v in last.items()}
    if evaluate:
        ev = evaluate()
        accelerator.log({f"{name}/eval/{k}": v for k, v in ev.items()}, step=state["step"])
        out.update({f"eval_{k}": v for k, v in ev.items()})
    out["steps"] = state["step"]
    return out
