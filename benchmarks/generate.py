"""`python -m benchmarks.generate`: batched greedy generation, as `trainer.generate` does it, against the plain way.

Data: the grounding probe's held-out rows (trainer.dataset.grounding from the shipped ChEBI-20; built into
--data, reused when present). Model: SmolLM2-135M with a seeded random graph encoder and projector (answers
are not meant to be right; they must be the same both ways), prompts as the grounding benchmark's graph-only
cells (no SELFIES, the tokenizer's own system turn).

  plain   batches in input order, every row left-padded to the longest prompt and prefilled whole
  now     `trainer.generate.predict`: batches of similar prompt length, and the prompt prefix every row shares
          (the chat template's system turn) run once, its KV cache copied to each row

Per graph-token reduction: wall seconds both ways, `speedup` (plain / now), the prefill tokens each computes
and `same_answers` (share of rows whose answer is identical). Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from trainer.dataset.tasks import ROOT

TARGET_SPEEDUP = 1.25


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prefill_tokens(prompt_lengths: list[int], batches: list[list[int]], shared: list[int]) -> int:
    """Tokens the prefill computes: each batch's rows padded to its longest prompt; a shared prefix once."""
    return sum(len(b) * (max(prompt_lengths[k] for k in b) - p) + p for b, p in zip(batches, shared))


def compare(model, tok, ds, rows: list[int], batch_size: int, max_new_tokens: int) -> dict:
    from trainer.generate import batch_order, generate, predict, shared_prefix

    prompts = [torch.as_tensor(ds.ids[k][: ds.num_prompt[k]]) for k in rows]
    lengths = {k: len(p) for k, p in zip(rows, prompts)}
    plain_batches = [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]
    for cache in (False, True):  # warm-up: first-call costs (kernel choice, allocator) out of both timings
        generate(model, tok, [ds[k] for k in plain_batches[0]], max_new_tokens=max_new_tokens, prefix_cache=cache)
    t0 = time.perf_counter()
    plain = [a for b in plain_batches
             for a in generate(model, tok, [ds[k] for k in b], max_new_tokens=max_new_tokens, prefix_cache=False)]
    plain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    now = [r["prediction"] for r in predict(model, tok, ds, rows, batch_size, max_new_tokens=max_new_tokens)]
    now_s = time.perf_counter() - t0
    order = batch_order(ds, rows)  # predict's batches
    now_batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    by_row = dict(zip(rows, prompts))
    shared = [shared_prefix([by_row[k] for k in b], model.graph_token_id) if len(b) > 1 else 0 for b in now_batches]
    return {"rows": len(rows), "plain_s": round(plain_s, 2), "now_s": round(now_s, 2),
            "speedup": round(plain_s / now_s, 3),
            "mean_prompt_tokens": round(sum(lengths.values()) / len(rows), 1),
            "shared_prefix_tokens": max(shared),
            "plain_prefill_tokens": prefill_tokens(lengths, plain_batches, [0] * len(plain_batches)),
            "now_prefill_tokens": prefill_tokens(lengths, now_batches, shared),
            "same_answers": round(sum(a == b for a, b in zip(plain, now)) / len(rows), 4)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=240, help="held-out rows per reduction (from the first)")
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=6, help="the grounding benchmark's setting")
    p.add_argument("--reductions", default="hierarchical,none")
    p.add_argument("--llm", default="smollm2-135m", help="tiny-random: a pipeline check")
    p.add_argument("--data", default=os.path.join(ROOT, "runs", "bench", "generate"))
    a = p.parse_args(argv)
    from graph.encoder import EncoderConfig, HierarchicalEncoder
    from trainer.dataset.instructions import InstructionDataset, PromptConfig
    from trainer.experiments import grounding_folders
    from trainer.models.llm import GRAPH_TOKEN, load_llm
    from trainer.models.multimodal_lm import MultimodalLM
    from trainer.models.projector import GraphProjector, ProjectorConfig

    log("grounding held-out rows (built on the first run, then reused)")
    test = grounding_folders(a.data)["test"]
    tok, lm = load_llm(a.llm, attn_implementation="sdpa")
    result = {"llm": a.llm, "batch_size": a.batch_size, "max_new_tokens": a.max_new_tokens,
              "threads": torch.get_num_threads()}
    plain_s = now_s = 0.0
    for reduction in a.reductions.split(","):
        torch.manual_seed(0)
        enc = HierarchicalEncoder(EncoderConfig())
        proj = GraphProjector(ProjectorConfig(in_dim=enc.out_dim, out_dim=lm.config.hidden_size, reduction=reduction))
        model = MultimodalLM(lm, enc, proj, tok.convert_tokens_to_ids(GRAPH_TOKEN)).eval()
        ds = InstructionDataset(test, tok, reduction=reduction, prompt=PromptConfig(use_selfies=False, system=None))
        rows = list(range(min(a.rows, len(ds))))
        result[reduction] = compare(model, tok, ds, rows, a.batch_size, a.max_new_tokens)
        plain_s, now_s = plain_s + result[reduction]["plain_s"], now_s + result[reduction]["now_s"]
        log(f"{reduction}: {result[reduction]}")
    result["speedup"] = round(plain_s / now_s, 3)
    result["same_answers"] = min(result[r]["same_answers"] for r in a.reductions.split(","))
    result["target_speedup"] = TARGET_SPEEDUP
    result["meets_target"] = result["speedup"] >= TARGET_SPEEDUP and result["same_answers"] == 1.0
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
