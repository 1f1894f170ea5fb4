"""Generation with graph tokens: `python -m trainer.generate --model EXPORT --data FOLDER --out preds.jsonl`.

EXPORT is an export folder, a training checkpoint (RUN_DIR/STAGE/checkpoints/step-N, which holds one) or a
stage folder (RUN_DIR/STAGE: its final export, else its latest checkpoint).

Prompts are embedded once per batch (one encoder call), left-padded so every row's last prompt token
sits at the same position, then decoded greedily or with beam search on plain SDPA (the packed-training
`sdpa_varlen` kernel needs sample boundaries, which a KV cache does not have). Molecule answers
(SELFIES) are also decoded to SMILES. Several processes (`accelerate launch`) each take a contiguous
slice of the rows; the slices are gathered back in input order. Output: JSONL with `target` and
`prediction` (what `python -m trainer.evaluate` reads), the record's `metadata` (a dict: the grounding
task's question types) and, with --tsv, the MolT5 layout.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch


@torch.no_grad()
def generate(model, tok, items: list[dict], max_new_tokens: int = 128, num_beams: int = 1) -> list[str]:
    """Decoded answers for dataset items (trainer.dataset.instructions), in order; the answer part is ignored."""
    base = model._base()
    impl, was_training = base.config._attn_implementation, model.training
    if impl != "sdpa":  # the packed-training kernels need sample boundaries, which a KV cache does not have
        base.set_attn_implementation("sdpa")
    model.eval()
    try:
        return _generate(model, tok, items, max_new_tokens, num_beams)
    finally:  # the caller's model comes back as it was (attention kernel, train/eval mode)
        if impl != "sdpa":
            base.set_attn_implementation(impl)
        model.train(was_training)


def _generate(model, tok, items, max_new_tokens, num_beams):
    from torch_geometric.data import Batch

    prompts = [torch.as_tensor(it["input_ids"][: it["num_prompt"]]) for it in items]
    width = max(len(p) for p in prompts)
    device = model.device
    ids = torch.full((len(items), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    graphs = [g for it in items for g in it["graphs"]]
    batch = Batch.from_data_list(graphs).to(device) if graphs else None
    from .dataset.collator import condition_inputs

    embeds = model.embed(ids.to(device), batch, len(graphs), condition_inputs(items))  # a dynamic projector's condition
    out = model.llm.generate(inputs_embeds=embeds, attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=num_beams, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, use_cache=True)  # training loads set use_cache=False
    return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def to_smiles(answer: str) -> str | None:
    """Canonical SMILES of a SELFIES answer, or None (prose, or an invalid / cut-off molecule)."""
    from rdkit import Chem

    from .metrics import looks_like_selfies, to_smiles as decode

    if not looks_like_selfies(answer.strip()):
        return None
    text = decode(answer, "selfies")
    mol = Chem.MolFromSmiles(text) if text else None
    return Chem.MolToSmiles(mol) if mol is not None and mol.GetNumAtoms() else None


def predict(model, tok, dataset, rows: list[int], batch_size: int, **kw) -> list[dict]:
    from tqdm import tqdm

    from .dataset.instructions import metadata_dict

    out = []
    for s in tqdm(range(0, len(rows), batch_size), desc="generate", file=sys.stderr, disable=len(rows) <= batch_size):
        items = [dataset[k] for k in rows[s:s + batch_size]]
        for it, answer in zip(items, generate(model, tok, items, **kw)):
            rec = dataset.record(it["index"])
            out.append({"row": it["row"], "instruction": rec["instruction"], "input": rec["input"],
                        "target": rec["output"], "prediction": answer, "prediction_smiles": to_smiles(answer),
                        "target_smiles": rec.get("output_smiles"), "metadata": metadata_dict(rec.get("metadata"))})
    return out


def process_state():
    """Accelerate's process state. Launched on several CPU processes it needs the gloo backend, or every
    rank runs alone with num_processes 1 (and each writes every row)."""
    from accelerate import PartialState

    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        return PartialState(cpu=True, backend="gloo")
    return PartialState()


def main(argv=None) -> int:
    from accelerate.utils import gather_object

    from graph.atomic import atomic_writer

    from .models.export import dataset_for, load_export

    p = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="export folder (RUN_DIR/STAGE/export), checkpoint "
                                                  "(RUN_DIR/STAGE/checkpoints/step-N) or stage folder")
    p.add_argument("--data", required=True, help="preprocessed instruction folder")
    p.add_argument("--out", required=True, help="predictions JSONL")
    p.add_argument("--tsv", help="also write the MolT5 TSV layout (ground truth, output)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    a = p.parse_args(argv)
    from .models.export import resolve

    if not os.path.isdir(a.data):
        print(f"error: data folder not found: {a.data}", file=sys.stderr)
        return 2
    try:
        model_dir = resolve(a.model)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = process_state()
    tok, model, meta = load_export(model_dir)
    model.to(state.device)
    ds = dataset_for(meta, a.data, tok)
    rows = list(range(len(ds) if a.limit is None else min(a.limit, len(ds))))
    with state.split_between_processes(rows) as mine:  # contiguous slices, in rank order
        preds = predict(model, tok, ds, list(mine), a.batch_size, max_new_tokens=a.max_new_tokens, num_beams=a.num_beams)
    preds = gather_object(preds) if state.num_processes > 1 else preds
    if state.is_main_process:
        with atomic_writer(a.out) as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in preds)
        if a.tsv:
            with atomic_writer(a.tsv) as f:
                w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
                w.writerow(["input", "ground truth", "output"])
                w.writerows([[r["input"], r["target"], r["prediction"]] for r in preds])
        print(json.dumps({"predictions": len(preds), "skipped_longer_than_max_length": len(ds.rejects), "out": a.out,
                          "model": model_dir, "num_processes": state.num_processes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
