"""`make demo`: the main job on the shipped samples, end to end, on a laptop.

1. preprocess the shipped ChEBI-20 and USPTO-50K samples through a local Ray cluster into
   hierarchical-graph shards, and draw one molecule's motifs;
2. pretrain the graph encoder (stage 0a) and align it with text (stage 0b) with
   `accelerate launch` on 2 CPU processes (launch_configs/recipes/demo.yaml);
and print a one-line JSON summary last. Everything lands under runs/demo/.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")


def main(out: str = os.path.join(ROOT, "runs", "demo")) -> dict:
    import ray

    from graph.chem import Standardizer, canonical_order
    from graph.inspect import draw_motifs
    from graph.preprocess import connect_ray, read_table, run

    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    summary: dict = {"stages": [], "out": out}
    connect_ray()  # one local cluster for the four preprocessing runs
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

    run_dir = os.path.join(out, "train")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "launch_configs", "accelerate", "cpu_2proc.yaml"), os.path.join(ROOT, "trainer", "run.py"),
           "--config", os.path.join(ROOT, "launch_configs", "recipes", "demo.yaml"), f"run_dir={run_dir}"]
    data = os.path.join(out, "data")
    cmd += [f"encoder_ssl.data=[{data}/chebi20_train,{data}/uspto_train:reactants_,{data}/uspto_train:products_]",
            f"encoder_contrastive.data={data}/chebi20_train", f"encoder_contrastive.val_data={data}/chebi20_test"]
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"training failed (exit {r.returncode}): {' '.join(cmd)}")
    train = json.loads(r.stdout.strip().splitlines()[-1])
    summary["num_processes"] = train["num_processes"]
    for name, m in train["stages"].items():
        summary["stages"].append(name)
        summary[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()
                         if k.startswith(("eval_", "loss", "steps", "encoder", "elapsed"))}
    summary["elapsed_s"] = round(time.time() - t0, 1)
    return summary


if __name__ == "__main__":
    s = main(*sys.argv[1:])
    print(json.dumps(s))
