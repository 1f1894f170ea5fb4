"""`make demo`: the main job on the shipped samples, end to end, on a laptop.

1. preprocess the shipped ChEBI-20 and USPTO-50K samples through a local Ray cluster into
   hierarchical-graph shards, and draw one molecule's motifs;
2. pretrain the graph encoder (stage 0a) and align it with text (stage 0b) with
   `accelerate launch` on 2 CPU processes (launch_configs/recipes/demo.yaml);
3. convert the samples into instruction data (molecule description, forward prediction) and train the
   multimodal SmolLM2-135M: stage 1 (projector) and stage 2 (LoRA, forward prediction) on 2 CPU
   processes under DeepSpeed ZeRO-2 (launch_configs/recipes/demo_llm.yaml), exporting a PEFT folder;
4. generate answers for 16 held-out reactions with the exported model and score them (every row counts),
   printing the metrics table;
5. ask the trained model one question from SMILES (`trainer.ask`: a held-out reaction's reactants);
and print a one-line JSON summary last (with the metrics). Everything lands under runs/demo/.
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

    from .dataset.tasks import prepare_shipped

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
    summary["generations"], summary["metrics"], summary["ask"] = _evaluate(summary["export"], tasks["forward_test"], n=16)
    summary["stages"] += ["evaluate", "ask"]
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


def _evaluate(export: str, folder: str, n: int) -> tuple[list[dict], dict, dict]:
    """Greedy answers of the exported model for the first n held-out reactions, scored over every row
    (a cut-off or invalid answer is wrong, not dropped); prints a few answers and the metrics table; then
    asks the model one question from SMILES (trainer.ask, the first held-out reaction's reactants)."""
    from .ask import Assistant
    from .evaluate import compute
    from .experiments import markdown_table
    from .models.export import dataset_for, load_export
    from .generate import predict

    tok, model, meta = load_export(export)
    ds = dataset_for(meta, folder, tok)
    preds = predict(model, tok, ds, list(range(min(n, len(ds)))), batch_size=8, max_new_tokens=96)
    for p in preds[:4]:
        print(f"[generate] target {p['target']}\n           output {p['prediction']}", file=sys.stderr)
    metrics = {k: round(v, 4) for k, v in compute("forward", [p["target"] for p in preds],
                                                  [p["prediction"] for p in preds]).items()}
    print(f"[evaluate] forward prediction, {len(preds)} held-out reactions, greedy, 96 new tokens:\n"
          + markdown_table([{"model": "demo stage 2", "rows": len(preds), **metrics}], ["model", "rows", *metrics]),
          file=sys.stderr)
    keep = ("input", "target", "prediction", "prediction_smiles")
    reactants = preds[0]["metadata"]["input_smiles"]
    answer = Assistant(tok, model, meta, export).ask(reactants, task="forward", max_new_tokens=96)
    print(f"[ask] {answer['instruction']}\n      {reactants}\n      -> {answer['smiles'] or answer['answer']}",
          file=sys.stderr)
    ask = {"smiles": reactants, "task": "forward", "instruction": answer["instruction"], "answer": answer["answer"],
           "answer_smiles": answer["smiles"], "valid": answer["valid"], "expected_smiles": preds[0]["target_smiles"]}
    return [{k: p[k] for k in keep} for p in preds[:4]], {"task": "forward", "rows": len(preds), **metrics}, ask


if __name__ == "__main__":
    s = main(*sys.argv[1:])
    print(json.dumps(s))
