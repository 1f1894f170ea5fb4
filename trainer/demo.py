"""`make demo`: the main job on the shipped samples, end to end, on a laptop.

Preprocesses the shipped ChEBI-20 and USPTO-50K samples through a local Ray cluster into
hierarchical-graph shards, draws one molecule's motifs, and prints a one-line JSON summary last.
Everything lands under runs/demo/.
"""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")


def main(out: str = os.path.join(ROOT, "runs", "demo")) -> dict:
    import ray

    from graph.chem import Standardizer, canonical_order
    from graph.inspect import draw_motifs
    from graph.preprocess import read_table, run

    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    summary: dict = {"stages": [], "out": out}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 * 1024)
    try:
        for name, src in (("chebi20_train", "chebi20/train.txt"), ("chebi20_test", "chebi20/test.txt"),
                          ("uspto_train", "uspto50k/train.csv"), ("uspto_test", "uspto50k/test.csv")):
            m = run(os.path.join(DATA, src), os.path.join(out, "data", name), chunk_size=100)
            summary[f"preprocess_{name}"] = {k: m[k] for k in ("input_rows", "accepted", "rejected", "rejected_by_reason")}
    finally:
        ray.shutdown()
    summary["stages"].append("preprocess")

    first = read_table(os.path.join(out, "data", "chebi20_train"), columns=["smiles"]).column("smiles")[0].as_py()
    mol, _ = canonical_order(Standardizer().parent(first))
    png = os.path.join(out, "motifs.png")
    summary["picture"] = {"png": png, "smiles": first, "motifs": draw_motifs(mol, png)}
    summary["stages"].append("inspect")
    summary["elapsed_s"] = round(time.time() - t0, 1)
    return summary


if __name__ == "__main__":
    s = main(*sys.argv[1:])
    print(json.dumps(s))
