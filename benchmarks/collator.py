"""`python -m benchmarks.collator`: how many of the tokens a step computes are real, packed vs padded.

Data: the shipped ChEBI-20 (molecule description) and USPTO-50K (forward reaction prediction,
retrosynthesis) samples, converted and preprocessed (trainer.dataset.tasks), tokenised with SmolLM2's tokenizer
and its chat template, graph tokens of reduction `none` (atoms + motifs + graph node per molecule).

  packed_token_efficiency   real tokens / (rows x budget): every row counted at the full budget, i.e.
                            for a fixed-shape step (stricter than padding to the longest row)
  padded_token_efficiency   real tokens / (batch x longest sample), batches in random order (InstructMol)
  grouped_token_efficiency  the same with LLaVA / HF length-grouped batches
Per data set and for the three mixed (a multitask epoch). Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from trainer.dataset.collator import Collator, plan_batches
from trainer.dataset.instructions import InstructionDataset, PromptConfig
from trainer.models.llm import SMOLLM2, load_tokenizer
from trainer.dataset.tasks import ROOT, prepare_shipped

TARGET_PACKED = 0.95


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def efficiencies(lengths: np.ndarray, budget: int, batch_size: int, seed: int = 0) -> dict:
    out = {}
    col = Collator(pad_id=0, budget=budget)
    rows = sum(len(col.rows(lengths[b].tolist())) for b in plan_batches(lengths, "packed", seed, 0, budget=budget))
    out["packed_token_efficiency"] = float(lengths.sum() / (rows * budget))
    for mode in ("padded", "grouped"):
        plan = plan_batches(lengths, mode, seed, 0, batch_size=batch_size)
        out[f"{mode}_token_efficiency"] = float(lengths.sum() / sum(len(b) * lengths[b].max() for b in plan))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=int, default=2048, help="packing budget, tokens per row")
    p.add_argument("--batch-size", type=int, default=8, help="samples per padded batch")
    p.add_argument("--data", default=os.path.join(ROOT, "runs", "bench", "instructions"))
    a = p.parse_args(argv)
    log("preparing the shipped samples (convert + preprocess, reused when present)")
    folders = prepare_shipped(a.data)
    tok = load_tokenizer(SMOLLM2)
    prompt = PromptConfig(max_length=a.budget)
    lengths, result, skipped = {}, {"budget": a.budget, "batch_size": a.batch_size}, 0
    for task, folder in folders.items():
        ds = InstructionDataset(folder, tok, prompt=prompt)
        lengths[task], skipped = ds.lengths, skipped + len(ds.rejects)
        result[task] = {"samples": len(ds), "mean_length": round(float(ds.lengths.mean()), 1),
                        "max_length": int(ds.lengths.max()),
                        **{k: round(v, 4) for k, v in efficiencies(ds.lengths, a.budget, a.batch_size).items()}}
        log(f"{task}: {result[task]}")
    mixed = np.concatenate(list(lengths.values()))
    result.update({k: round(v, 4) for k, v in efficiencies(mixed, a.budget, a.batch_size).items()})
    result["samples"], result["skipped_longer_than_budget"] = int(len(mixed)), skipped
    result["target_packed_token_efficiency"] = TARGET_PACKED
    result["packed_target_met"] = result["packed_token_efficiency"] >= TARGET_PACKED
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
