"""`python -m benchmarks.train_step`: training-step throughput of the multimodal model, packed vs padded.

Model: a LLaMA of SmolLM2-135M's width (hidden 576, 9 heads / 3 KV heads, MLP 1536, 49,152 vocabulary,
tied embeddings) with 4 layers and random weights; the hierarchical encoder (5 x 300, frozen); the
2-layer MLP projector and LoRA (r 64, alpha 16, every linear layer of the LLM except the head) train.
Steps are forward + backward + AdamW, fp32, on the shipped ChEBI-20 / USPTO-50K samples (molecule
description, forward prediction, retrosynthesis) tokenised by SmolLM2's tokenizer, graph tokens `none`.

Every mode runs the SAME random subset of samples; throughput counts real tokens (no padding) / s:
  packed   rows of `--budget` tokens, attention per sample (`sdpa_varlen`: no masked blocks computed)
  padded   `--batch-size` samples in random order, padded to the longest (InstructMol / HIGHT)
  grouped  padded, length-grouped batches (LLaVA / HF `group_by_length`)
  packed_mask  packed rows with a block-diagonal mask on plain SDPA (reported to show why varlen)
`max_abs_logit_diff_packed_vs_separate`: one packed micro-batch against each of its samples run
alone with plain SDPA, fp32. The modes alternate over `--repeats` rounds so machine load hits them
alike. Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch

from graph.encoder import EncoderConfig, HierarchicalEncoder
from trainer.dataset.collator import Collator, plan_batches
from trainer.dataset.instructions import InstructionDataset, PromptConfig, TaskMix
from trainer.models.llm import GRAPH_TOKEN, SMOLLM2, load_tokenizer
from trainer.models.multimodal_lm import MultimodalLM
from trainer.models.projector import GraphProjector, ProjectorConfig
from trainer.dataset.tasks import ROOT, prepare_shipped

TARGETS = {"packed_vs_padded_tokens_per_s_min": 1.5, "packed_vs_grouped_tokens_per_s_min": 1.0,
           "max_abs_logit_diff_max": 1e-4}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_model(tok, layers: int, lora_r: int) -> MultimodalLM:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trainer.models.attention import register
    from trainer.models.lora import add_lora

    register()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, num_hidden_layers=layers, tie_word_embeddings=True,
                      max_position_embeddings=8192, attn_implementation="sdpa")
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    lm.requires_grad_(False)
    lm = add_lora(lm, r=lora_r, alpha=16, dropout=0.05, target_modules="all-linear")
    enc = HierarchicalEncoder(EncoderConfig())
    proj = GraphProjector(ProjectorConfig(in_dim=enc.out_dim, out_dim=576, kind="mlp2"))
    return MultimodalLM(lm, enc, proj, tok.convert_tokens_to_ids(GRAPH_TOKEN))


def set_attention(model: MultimodalLM, impl: str) -> None:
    model._base().set_attn_implementation(impl)


def run_mode(model, opt, batches: list[dict], forward_ctx=contextlib.nullcontext) -> tuple[float, int, list[float]]:
    """(seconds, real tokens, losses) for forward + backward + optimizer step over `batches`; the forward runs
    in `forward_ctx()` (an autocast, as Accelerate wraps it)."""
    model.train()
    t0, tokens, losses = time.perf_counter(), 0, []
    for b in batches:
        with forward_ctx():
            out = model(b)
        loss = out.loss_sum / out.num_tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += b["real_tokens"]
        losses.append(loss.item())
    return time.perf_counter() - t0, tokens, losses


@torch.no_grad()
def logit_diff(model, items: list[dict], plan_batch: list[int], packed: Collator, single: Collator) -> float:
    model.eval()
    set_attention(model, "sdpa_varlen")
    b = packed([items[k] for k in plan_batch])
    logits = model.logits(b)
    set_attention(model, "sdpa")
    worst = 0.0
    for r, at, n, k in b["spans"]:
        alone = model.logits(single([items[k]]))[0, :n]
        worst = max(worst, (alone - logits[r, at:at + n]).abs().max().item())
    return worst


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=0, help="padded batch; 0: budget / mean length")
    p.add_argument("--samples", type=int, default=96, help="random subset every mode trains on")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--data", default=os.path.join(ROOT, "runs", "bench", "instructions"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    log("preparing the shipped samples (convert + preprocess, reused when present)")
    folders = prepare_shipped(a.data)
    tok = load_tokenizer(SMOLLM2)
    ds = TaskMix([InstructionDataset(f, tok, prompt=PromptConfig(max_length=a.budget)) for f in folders.values()])
    lengths = ds.lengths
    items = [ds[i] for i in range(len(ds))]  # built once; every mode collates the same items
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(len(items), size=min(a.samples, len(items)), replace=False))
    sub_len = lengths[subset]
    bs = a.batch_size or max(1, round(a.budget / float(sub_len.mean())))
    packed, single = Collator(tok.pad_token_id, budget=a.budget), Collator(tok.pad_token_id, packed=False)

    def batches(mode: str) -> list[dict]:
        plan = plan_batches(sub_len, "packed" if mode.startswith("packed") else mode, 0, 0, budget=a.budget,
                            batch_size=bs)
        col = packed if mode.startswith("packed") else single
        return [col([items[subset[k]] for k in b]) for b in plan]

    modes = {"packed": "sdpa_varlen", "padded": "sdpa", "grouped": "sdpa", "packed_mask": "sdpa"}
    data = {m: batches(m) for m in modes}
    model = build_model(tok, a.layers, a.lora_r)
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    n_train = sum(q.numel() for q in trainable)
    log(f"{len(subset)} samples (mean {sub_len.mean():.0f} tokens), padded batch {bs}, budget {a.budget}, "
        f"{n_train / 1e6:.2f}M trainable; batches: " + ", ".join(f"{m} {len(b)}" for m, b in data.items()))
    for m, impl in modes.items():  # warm-up: one step each (allocator, kernels)
        set_attention(model, impl)
        run_mode(model, opt, data[m][:1])
    totals = {m: [0.0, 0] for m in modes}
    for r in range(a.repeats):
        for m, impl in modes.items():
            set_attention(model, impl)
            s, n, loss = run_mode(model, opt, data[m])
            totals[m][0] += s
            totals[m][1] += n
            log(f"round {r}: {m:12s} {n / s:8.1f} tokens/s ({s:.1f} s, loss {np.mean(loss):.3f})")
    tps = {m: n / s for m, (s, n) in totals.items()}
    eff = {m: sum(b["real_tokens"] for b in data[m]) / sum(b["input_ids"].numel() for b in data[m]) for m in modes}
    first_multi = next(b for b in plan_batches(sub_len, "packed", 0, 0, budget=a.budget) if len(b) > 1)
    diff = logit_diff(model, items, [int(subset[k]) for k in first_multi], packed, single)
    result = {
        "packed_vs_padded_tokens_per_s": round(tps["packed"] / tps["padded"], 3),
        "packed_vs_grouped_tokens_per_s": round(tps["packed"] / tps["grouped"], 3),
        "packed_mask_vs_padded_tokens_per_s": round(tps["packed_mask"] / tps["padded"], 3),
        "max_abs_logit_diff_packed_vs_separate": diff,
        "tokens_per_s": {m: round(v, 1) for m, v in tps.items()},
        "computed_token_efficiency": {m: round(v, 4) for m, v in eff.items()},
        "samples": int(len(subset)), "mean_sample_tokens": round(float(sub_len.mean()), 1), "budget": a.budget,
        "padded_batch_size": bs, "layers": a.layers, "lora_r": a.lora_r, "trainable_params": n_train,
        "threads": torch.get_num_threads(), "targets": TARGETS,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
