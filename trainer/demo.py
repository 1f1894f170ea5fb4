"""`make demo`: the main job on the shipped samples, end to end, on a laptop.

1. preprocess the shipped ChEBI-20 and USPTO-50K samples through a local Ray cluster into
   hierarchical-graph shards, and draw one molecule's motifs;
2. pretrain the graph encoder (stage 0a) and align it with text (stage 0b) with
   `accelerate launch` on 2 CPU processes (launch_configs/recipes/demo.yaml);
3. convert the samples into instruction data (molecule description, forward prediction) and train the
   multimodal SmolLM2-135M: stage 1 (projector) and stage 2 (LoRA, forward prediction) on 2 CPU
   processes under DeepSpeed ZeRO-2 (launch_configs/recipes/demo_llm.yaml), exporting a PEFT folder;
4. generate answers for a few held-out reactions with the exported model;
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

    from .tasks import prepare_shipped

    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    summary: dict = {"stages": [], "out": out}
    connect_ray()  # one local cluster for every preprocessing run
    try:
        for name, src in (("chebi20_train", "chebi20/train.txt"), ("chebi20_test", "chebi20/test.txt"),
                          ("uspto_train", "uspto50k/train.csv"), ("uspto_test", "uspto50k/test.csv")):
            m = run(os.path.join(DATA, src), os.path.join(out, "data", name), chunk_size=100)
            summary[f"preprocess_{name}"] = {k: m[k] for k in ("input_rows", "accepted", "rejected", "rejected_by_reason")}
        tasks = prepare_shipped(os.path.join(out, "data"), tasks=("molcap", "forward"))
        tasks["forward_test"] = prepare_shipped(os.path.join(out, "data"), tasks=("forward",), split="test")["forward"]
    finally:
        ray.shutdown()
    summary["stages"].append("preprocess")

    first = read_table(os.path.join(out, "data", "chebi20_train"), columns=["smiles"]).column("smiles")[0].as_py()
    mol, _ = canonical_order(Standardizer().parent(first))
    png = os.path.join(out, "motifs.png")
    summary["picture"] = {"png": png, "smiles": first, "motifs": draw_motifs(mol, png)}
    summary["stages"].append("inspect")

    run_dir = os.path.join(out, "train")
    data = os.path.join(out, "data")
    encoder = _launch("cpu_2proc.yaml", "demo.yaml", run_dir, [
        f"encoder_ssl.data=[{data}/chebi20_train,{data}/uspto_train:reactants_,{data}/uspto_train:products_]",
        f"encoder_contrastive.data={data}/chebi20_train", f"encoder_contrastive.val_data={data}/chebi20_test"])
    llm = _launch("cpu_2proc_zero2.yaml", "demo_llm.yaml", run_dir,
                  [f"align.data=[{tasks['molcap']}]", f"lora.data=[{tasks['forward']}]"])
    summary["num_processes"] = llm["num_processes"]
    summary["distributed_type"] = llm["distributed_type"]
    for name, m in {**encoder["stages"], **llm["stages"]}.items():
        summary["stages"].append(name)
        summary[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()
                         if k.startswith(("eval_", "loss", "steps", "encoder", "elapsed", "export", "tokens_per_s",
                                          "frozen_params", "ranks_identical"))}
    summary["export"] = llm["stages"]["lora"]["export"]
    summary["generations"] = _generate(summary["export"], tasks["forward_test"], n=4)
    summary["stages"].append("generate")
    from .metrics import molecule_metrics

    g = summary["generations"]  # every row counts: cut-off or invalid answers are wrong, not dropped
    summary["metrics"] = {k: round(v, 4) for k, v in molecule_metrics([x["target"] for x in g],
                                                                      [x["prediction"] for x in g], "selfies").items()}
    print(f"[evaluate] forward prediction on {len(g)} held-out reactions: {summary['metrics']}", file=sys.stderr)
    summary["elapsed_s"] = round(time.time() - t0, 1)
    return summary


def _launch(accel: str, recipe: str, run_dir: str, overrides: list[str]) -> dict:
    """`accelerate launch trainer/run.py` on 2 CPU processes; its JSON summary."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "launch_configs", "accelerate", accel), os.path.join(ROOT, "trainer", "run.py"),
           "--config", os.path.join(ROOT, "launch_configs", "recipes", recipe), f"run_dir={run_dir}", *overrides]
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"training failed (exit {r.returncode}): {' '.join(cmd)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _generate(export: str, folder: str, n: int) -> list[dict]:
    """Greedy answers of the exported model for the first n held-out samples, printed as they come."""
    from .export import load_export
    from .generate import generate, to_smiles
    from .instructions import InstructionDataset, PromptConfig

    tok, model, meta = load_export(export)
    ds = dataset_for(meta, folder, tok)
    items = [ds[i] for i in range(min(n, len(ds)))]
    out = []
    for it, answer in zip(items, generate(model, tok, items, max_new_tokens=96)):
        rec = ds.record(it["index"])
        out.append({"input": rec["input"], "target": rec["output"], "prediction": answer,
                    "prediction_smiles": to_smiles(answer)})
        print(f"[generate] target {rec['output']}\n           output {answer}", file=sys.stderr)
    return out


if __name__ == "__main__":
    s = main(*sys.argv[1:])
    print(json.dumps(s))
