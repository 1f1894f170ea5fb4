"""`python -m benchmarks.mixed_precision`: what `mixed_precision: auto` buys, fp32 against bf16 autocast.

Model: SmolLM2-135M (real weights) with LoRA r 16 on every linear layer but the head (the grounding recipe's
stage 2), a seeded random hierarchical encoder (frozen) and the 2-layer MLP projector; grounding-probe rows
with graph tokens and their SELFIES (trainer.dataset.grounding from the shipped ChEBI-20, built into --data and
reused, as benchmarks.generate).

  train     forward (autocast when bf16; weights stay fp32) + backward + AdamW on the same packed rows of
            --budget tokens, from the same weights each time, fp32 and bf16 alternating over --repeats rounds:
            tokens/s both ways and the first step's loss both ways
  generate  `trainer.generate.predict` (greedy, 6 new tokens, the grounding benchmark's setting) on the first
            --rows held-out rows both ways: seconds and `same_answers` (share of rows answered identically)

Speedups are fp32 time / bf16 time. `native_bf16` says whether `auto` picks bf16 on this machine
(trainer.run.resolve_precision: a bf16 GPU, or a CPU with AVX512-BF16 / AMX / ARM BF16); the targets apply
only then (without native kernels bf16 is emulated and slower, and `auto` stays fp32). Last stdout line: one
JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from benchmarks.train_step import log, run_mode
from trainer.dataset.tasks import ROOT
from trainer.run import autocast, resolve_precision

TARGETS = {"train_speedup_min": 1.3, "generate_speedup_min": 1.3, "first_loss_rel_diff_max": 0.01}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mixed_precision", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=24, help="training rows (a seeded random subset)")
    p.add_argument("--budget", type=int, default=1024, help="tokens per packed row (the grounding recipe's)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rows", type=int, default=120, help="held-out rows generated both ways")
    p.add_argument("--llm", default="smollm2-135m", help="tiny-random: a pipeline check")
    p.add_argument("--data", default=os.path.join(ROOT, "runs", "bench", "generate"))
    a = p.parse_args(argv)
    from accelerate.utils import send_to_device

    from graph.encoder import EncoderConfig, HierarchicalEncoder
    from trainer.dataset.collator import Collator, plan_batches
    from trainer.dataset.instructions import InstructionDataset, PromptConfig
    from trainer.experiments import grounding_folders
    from trainer.generate import predict
    from trainer.models.llm import GRAPH_TOKEN, load_llm
    from trainer.models.lora import add_lora
    from trainer.models.multimodal_lm import MultimodalLM
    from trainer.models.projector import GraphProjector, ProjectorConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log("grounding rows (built on the first run, then reused)")
    folders = grounding_folders(a.data)
    tok, lm = load_llm(a.llm, attn_implementation="sdpa_varlen")
    lm.requires_grad_(False)
    torch.manual_seed(0)
    lm = add_lora(lm, r=16, alpha=32, dropout=0.0)
    enc = HierarchicalEncoder(EncoderConfig()).requires_grad_(False)
    proj = GraphProjector(ProjectorConfig(in_dim=enc.out_dim, out_dim=lm.config.hidden_size, kind="mlp2"))
    model = MultimodalLM(lm, enc, proj, tok.convert_tokens_to_ids(GRAPH_TOKEN)).to(device)
    prompt = PromptConfig(max_length=a.budget, system=None)

    train = InstructionDataset(folders["train"], tok, prompt=prompt)
    subset = np.sort(np.random.default_rng(0).choice(len(train), size=min(a.samples, len(train)), replace=False))
    plan = plan_batches(train.lengths[subset], "packed", 0, 0, budget=a.budget)
    collate = Collator(tok.pad_token_id, budget=a.budget)
    batches = [send_to_device(collate([train[int(subset[k])] for k in b]), device) for b in plan]
    trainable = [q for q in model.parameters() if q.requires_grad]
    start = [q.detach().clone() for q in trainable]

    def train_round(bf16: bool, steps: list[dict]) -> tuple[float, int, list[float]]:
        with torch.no_grad():  # the same weights and a fresh optimizer every time
            for q, s in zip(trainable, start):
                q.copy_(s)
        opt = torch.optim.AdamW(trainable, lr=1e-3)
        return run_mode(model, opt, steps, forward_ctx=lambda: autocast("bf16" if bf16 else "no", device.type))

    log(f"{len(subset)} samples in {len(batches)} packed rows of <= {a.budget} tokens; "
        f"{sum(q.numel() for q in trainable) / 1e6:.2f}M trainable; warm-up")
    for bf16 in (False, True):
        train_round(bf16, batches[:1])
    seconds, first = {False: 0.0, True: 0.0}, {}
    tokens = 0
    for r in range(a.repeats):
        for bf16 in (False, True):
            s, n, losses = train_round(bf16, batches)
            seconds[bf16] += s
            first.setdefault(bf16, losses[0])
            log(f"round {r}: {'bf16' if bf16 else 'fp32'} {n / s:7.1f} tokens/s ({s:.1f} s, first loss {losses[0]:.4f})")
        tokens += n

    test = InstructionDataset(folders["test"], tok, prompt=prompt)
    rows = list(range(min(a.rows, len(test))))
    answers, gen_s = {}, {}
    model.eval()
    for bf16 in (False, True):
        with autocast("bf16" if bf16 else "no", device.type):
            predict(model, tok, test, rows[:8], batch_size=8, max_new_tokens=6)  # warm-up
            t0 = time.perf_counter()
            answers[bf16] = [x["prediction"] for x in predict(model, tok, test, rows, batch_size=24, max_new_tokens=6)]
            gen_s[bf16] = time.perf_counter() - t0
        log(f"generate {'bf16' if bf16 else 'fp32'}: {len(rows)} rows in {gen_s[bf16]:.1f} s")

    native = resolve_precision("auto") == "bf16"
    result = {
        "device": device.type, "native_bf16": native, "llm": a.llm, "threads": torch.get_num_threads(),
        "train_rows": len(batches), "train_tokens_per_round": tokens // a.repeats,
        "fp32_tokens_per_s": round(tokens / seconds[False], 1), "bf16_tokens_per_s": round(tokens / seconds[True], 1),
        "train_speedup": round(seconds[False] / seconds[True], 3),
        "fp32_first_loss": round(first[False], 5), "bf16_first_loss": round(first[True], 5),
        "first_loss_rel_diff": round(abs(first[True] - first[False]) / abs(first[False]), 5),
        "generate_rows": len(rows), "fp32_generate_s": round(gen_s[False], 2), "bf16_generate_s": round(gen_s[True], 2),
        "generate_speedup": round(gen_s[False] / gen_s[True], 3),
        "same_answers": round(sum(x == y for x, y in zip(answers[False], answers[True])) / len(rows), 4),
        "targets": TARGETS,
    }
    result["meets_targets"] = (result["train_speedup"] >= TARGETS["train_speedup_min"]
                               and result["generate_speedup"] >= TARGETS["generate_speedup_min"]
                               and result["first_loss_rel_diff"] <= TARGETS["first_loss_rel_diff_max"]) if native else None
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
