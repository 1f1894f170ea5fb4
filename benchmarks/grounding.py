"""`python -m benchmarks.grounding`: does the LLM read the graph? The grounding probe at demo scale.

Runs the experiments recipe launch_configs/recipes/experiments_grounding.yaml (trainer.experiments: the
same stage 1 / stage 2 / generate / evaluate machinery as every task) on structure questions generated from
the shipped ChEBI-20 molecules with RDKit as ground truth (trainer/dataset/grounding.py; held-out molecules disjoint
by InChIKey), and reports accuracy over yes/no and count questions (every evaluated row counts):

  chance_accuracy                 the best constant answer per question type on the evaluated held-out rows
  selfies_only_accuracy           no graph tokens (the text baseline)
  graph_only_accuracy             {static cell: accuracy}, graph tokens only (no SELFIES in the prompt)
  best_static_graph_only_accuracy
  dynamic_graph_only_accuracy     the dynamic level-fusion projector, gates conditioned on the instruction
  dynamic_with_alignment_graph_only_accuracy   the same after the align_selfies stage
  gates_per_question_type         the trained gates of the dynamic cells
  targets                         best static >= chance + 0.10; dynamic >= best static; aligned > dynamic
  comparisons                     the same differences row by row with 95% intervals (trainer.stats: paired,
                                  whole molecules resampled): `verdict` "inconclusive" when the interval
                                  holds 0, i.e. the data cannot tell the two cells apart
  mixed_precision                 what the cells trained and scored in (the recipe's `auto`: bf16 autocast
                                  where the hardware has native bf16 matmuls, else fp32)

Targets are reported, not tuned for: the held-out molecules stay held out and chance is measured on them.
`--quick` runs the same study on the tiny random LLaMA with a few steps (a pipeline check, ~5 min).
Extra arguments are experiments-recipe overrides (e.g. lora.train.max_steps=200 eval.limit=540).
Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "launch_configs", "recipes", "experiments_grounding.yaml")
MARGIN = 0.10
QUICK = ["llm.name=tiny-random", "encoder.num_layers=2", "encoder.hidden=32", "train.max_steps=3", "train.log_every=1"]


def paired(out_dir: str, pairs: dict, scored_cell: str) -> dict:
    """{name: trainer.stats.paired_difference} of two cells' per-row correctness on the same held-out rows
    (each cell's preds.jsonl), resampling whole molecules. A pair is (cell a, cell b), skipped when one is
    None; the cell "chance" is the best constant answer per question type on the targets of `scored_cell`.
    Only yes/no and count rows, as `accuracy`."""
    from trainer.evaluate import read_rows
    from trainer.experiments import _slug
    from trainer.metrics import grounding_correct
    from trainer.stats import paired_difference

    scored = {}  # cell -> (targets, per-row correctness, metadata): each cell read and scored once

    def correct(cell):
        if cell not in scored:
            name = scored_cell if cell == "chance" else cell
            targets, outputs, metas, _ = read_rows(os.path.join(out_dir, "cells", "grounding", _slug(name), "preds.jsonl"))
            scored[cell] = targets, grounding_correct(targets, outputs, metas, chance=cell == "chance"), metas
        return scored[cell]

    out = {}
    for key, (a, b) in pairs.items():
        if a is None or b is None:
            continue
        (ta, ra, metas), (tb, rb, _) = correct(a), correct(b)
        if ta != tb:
            raise RuntimeError(f"cells {a} and {b} were scored on different held-out rows")
        keep = [i for i, r in enumerate(ra) if r is not None]
        mols = [(metas[i] or {}).get("inchikey", i) for i in keep]
        out[key] = {"a": a, "b": b, **paired_difference([ra[i] for i in keep], [rb[i] for i in keep], mols)}
    return out


def summarise(results: list[dict], wall_s: float, out_dir: str, precision: str = "no") -> dict:
    """The benchmark's JSON from the experiment rows (one task: grounding)."""
    done = {x["cell"]: x for x in results if x["status"] == "done"}
    acc = {c: x["metrics"].get("accuracy") for c, x in done.items()}
    static = {c: a for c, a in acc.items() if not done[c].get("dynamic") and done[c]["use_graph"]
              and not done[c]["use_selfies"] and c != "graph_only"}
    dyn = [c for c, x in done.items() if x.get("dynamic") and not x["aligned"] and not x["use_selfies"]]
    aligned = [c for c, x in done.items() if x.get("dynamic") and x["aligned"] and not x["use_selfies"]]
    any_row = next(iter(done.values()), {"metrics": {}})
    chance = any_row["metrics"].get("chance_accuracy")  # same held-out rows in every cell
    best = max(static.values()) if static else None
    d = acc[dyn[0]] if dyn else None
    a = acc[aligned[0]] if aligned else None
    gates = {c: done[c].get("gates", {}).get("by_question_type") for c in dyn + aligned}
    best_cell = max(static, key=static.get) if static else None
    comparisons = paired(out_dir, {
        "best_static_minus_chance": (best_cell, "chance"),
        "best_static_minus_selfies_only": (best_cell, "selfies_only" if "selfies_only" in done else None),
        "dynamic_minus_best_static": (dyn[0] if dyn else None, best_cell),
        "aligned_minus_dynamic": (aligned[0] if aligned else None, dyn[0] if dyn else None),
    }, next(iter(done))) if done else {}
    return {
        "chance_accuracy": chance,
        "selfies_only_accuracy": acc.get("selfies_only"),
        "graph_only_accuracy": static,
        "best_static_graph_only_accuracy": best,
        "best_static_graph_only_cell": best_cell,
        "dynamic_graph_only_accuracy": d,
        "dynamic_with_alignment_graph_only_accuracy": a,
        "held_out_rows": any_row.get("n_eval"),
        "yesno_accuracy": {c: x["metrics"].get("yesno_accuracy") for c, x in done.items()},
        "count_accuracy": {c: x["metrics"].get("count_accuracy") for c, x in done.items()},
        "chance_yesno_accuracy": any_row["metrics"].get("chance_yesno_accuracy"),
        "chance_count_accuracy": any_row["metrics"].get("chance_count_accuracy"),
        "gates_per_question_type": gates,
        "targets": {
            "best_static_above_chance_by_0.10": None if best is None or chance is None else best >= chance + MARGIN,
            "dynamic_at_least_best_static": None if d is None or best is None else d >= best,
            "alignment_improves_dynamic": None if a is None or d is None else a > d,
        },
        # accuracy differences with 95% intervals (paired, molecules resampled): a target met by a difference
        # whose interval holds 0 (or, for the first, 0.10) is not shown by these data
        "comparisons": comparisons,
        "failed_cells": [f"{x['cell']}: {x.get('error')}" for x in results if x["status"] != "done"],
        "mixed_precision": precision, "wall_s": round(wall_s, 1), "results": os.path.join(out_dir, "results.md"),
    }


def main(argv: list[str] | None = None) -> int:
    from trainer.experiments import _read_json, _slug, cells, load_recipe, precision, run

    p = argparse.ArgumentParser(prog="python -m benchmarks.grounding", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random LLaMA, a few steps: a pipeline check")
    p.add_argument("--out", default=None, help="output folder (default: the recipe's out_dir, or runs/bench/grounding_quick)")
    p.add_argument("overrides", nargs="*", help="experiments recipe overrides, key=value")
    a = p.parse_args(argv)
    over = list(a.overrides)
    if a.quick:
        over = [f"{s}.{q}" for s in ("align_selfies", "align", "lora") for q in QUICK] + ["eval.limit=36"] + over
        over.append(f"out_dir={a.out or os.path.join(ROOT, 'runs', 'bench', 'grounding_quick')}")
    elif a.out:
        over.append(f"out_dir={a.out}")
    recipe = load_recipe(RECIPE, over)
    t0 = time.time()
    summary = run(recipe)
    results = [x for c in cells(recipe.grid)
               if (x := _read_json(os.path.join(summary["out_dir"], "cells", "grounding", _slug(c["name"]), "result.json")))]
    out = summarise(results, time.time() - t0, summary["out_dir"], precision(recipe))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
