"""Generation with graph tokens: `python -m trainer.generate --model EXPORT --data FOLDER --out preds.jsonl`.

EXPORT is an export folder, a training checkpoint (RUN_DIR/STAGE/checkpoints/step-N, which holds one) or a
stage folder (RUN_DIR/STAGE: its final export, else its latest checkpoint).

Rows are batched by prompt length; each batch's prompts are embedded once (one encoder call) and decoded
greedily or with beam search on plain SDPA (the packed-training `sdpa_varlen` kernel needs sample
boundaries, which a KV cache does not have). Greedy batches run the prefix all their prompts share (the chat
template's system turn) once and copy its KV cache to every row, laid out [prefix | padding | rest] with
positions from the attention mask: the same answers as a full prefill. Molecule answers (SELFIES) are also
decoded to SMILES. Several processes (`accelerate launch`) each take a contiguous slice of the rows; the
slices are gathered back in input order. Under a DeepSpeed ZeRO-3 launch every rank builds only its partition
of the model, streamed from the export's safetensors (a backbone no rank can hold), and the ranks decode in
lockstep. Output: JSONL with `target` and `prediction` (what `python -m trainer.evaluate` reads), the record's
`metadata` (a dict: the grounding task's question types) and, with --tsv, the MolT5 layout.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch

from .run import PRECISIONS, autocast, launch_env, resolve_precision


@torch.no_grad()
def generate(model, tok, items: list[dict], max_new_tokens: int = 128, num_beams: int = 1,
             prefix_cache: bool = True, synced: bool = False) -> list[str]:
    """Decoded answers for dataset items (trainer.dataset.instructions), in order; the answer part is ignored.
    `prefix_cache` (greedy only): run the prompt prefix all rows share once (the same answers, faster).
    `synced` (a ZeRO-3 partitioned model: every forward is a collective): each rank runs as many forwards
    as the others, decoding on until all ranks are done; no prefix pass (its use differs from batch to batch)."""
    base = model._base()
    impl, was_training = base.config._attn_implementation, model.training
    if impl != "sdpa":  # the packed-training kernels need sample boundaries, which a KV cache does not have
        base.set_attn_implementation("sdpa")
    model.eval()
    try:
        return _generate(model, tok, items, max_new_tokens, num_beams, prefix_cache and not synced, synced)
    finally:  # the caller's model comes back as it was (attention kernel, train/eval mode)
        if impl != "sdpa":
            base.set_attn_implementation(impl)
        model.train(was_training)


def shared_prefix(prompts: list[torch.Tensor], stop: int) -> int:
    """Length of the prompt prefix every row shares (the chat template's system turn), short of each
    row's last token (its logits start the answer) and of the first `stop` token (a graph placeholder)."""
    n = min(len(p) for p in prompts) - 1
    same = prompts[0][:n] != stop
    for p in prompts[1:]:
        same &= p[:n] == prompts[0][:n]
    return int(same.long().cumprod(0).sum())


def _generate(model, tok, items, max_new_tokens, num_beams, prefix_cache, synced):
    from torch_geometric.data import Batch
    from transformers import DynamicCache

    from .dataset.collator import condition_inputs

    prompts = [torch.as_tensor(it["input_ids"][: it["num_prompt"]]) for it in items]
    # Greedy: the shared prefix is run once and its KV cache copied to every row (exact: same keys, same
    # positions). Rows are laid out [prefix | padding | rest]; positions follow the attention mask.
    pre = shared_prefix(prompts, model.graph_token_id) if prefix_cache and num_beams == 1 and len(items) > 1 else 0
    width = pre + max(len(p) - pre for p in prompts)
    ids = torch.full((len(items), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    ids[:, :pre], mask[:, :pre] = prompts[0][:pre], 1
    for i, p in enumerate(prompts):
        ids[i, width - len(p) + pre:] = p[pre:]
        mask[i, width - len(p) + pre:] = 1
    device = model.device
    graphs = [g for it in items for g in it["graphs"]]
    batch = Batch.from_data_list(graphs).to(device) if graphs else None
    embeds = model.embed(ids.to(device), batch, len(graphs), condition_inputs(items))  # a dynamic projector's condition
    kw = {}
    if pre:
        cache = DynamicCache(config=model._base().config)
        model.llm(inputs_embeds=embeds[:1, :pre], cache=cache, use_cache=True)
        cache.batch_repeat_interleave(len(items))
        kw["cache"] = cache
    out = model.llm.generate(inputs_embeds=embeds, attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=num_beams, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, use_cache=True, synced_gpus=synced, **kw)  # training loads set use_cache=False
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


def batch_order(dataset, rows: list[int]) -> list[int]:
    """The rows by prompt length: consecutive batches of them need little padding."""
    size = getattr(dataset, "num_prompt", dataset.lengths)
    return sorted(rows, key=lambda k: size[k])


def predict(model, tok, dataset, rows: list[int], batch_size: int, min_batches: int = 0, **kw) -> list[dict]:
    """Predictions for dataset rows, in `rows` order, batched in `batch_order`.
    `min_batches`: generate at least this many batches (ZeRO-3: as many as the rank with the most rows), the
    last one repeated, its repeats' answers dropped."""
    from tqdm import tqdm

    from .dataset.instructions import metadata_dict

    order = batch_order(dataset, rows)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    batches += [batches[-1] if batches else [0]] * max(0, min_batches - len(batches))
    done = {}
    for i, batch in enumerate(tqdm(batches, desc="generate", file=sys.stderr, disable=len(batches) <= 1)):
        items = [dataset[k] for k in batch]
        answers = generate(model, tok, items, synced=min_batches > 0, **kw)
        if i * batch_size < len(order):  # not a repeat
            done.update((k, (it["row"], it["index"], a)) for k, it, a in zip(batch, items, answers))
    out = []
    for k in rows:
        row, index, answer = done[k]
        rec = dataset.record(index)
        out.append({"row": row, "instruction": rec["instruction"], "input": rec["input"],
                    "target": rec["output"], "prediction": answer, "prediction_smiles": to_smiles(answer),
                    "target_smiles": rec.get("output_smiles"), "metadata": metadata_dict(rec.get("metadata"))})
    return out


def process_state():
    """Accelerate's process state. Under a DeepSpeed launch: an Accelerator (its ZeRO-3 settings partition the
    model). Launched on several CPU processes it needs the gloo backend, or every rank runs alone with
    num_processes 1 (and each writes every row)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed, cpu_ranks = launch_env()
    if deepspeed:
        return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu_ranks else [])
    if cpu_ranks:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        return PartialState(cpu=True, backend="gloo")
    return PartialState()


def main(argv=None) -> int:
    from accelerate.utils import gather_object

    from graph.atomic import atomic_writer

    from .models.export import dataset_for, load_export, zero3_inference_engine
    from .models.llm import zero3_run

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
    p.add_argument("--mixed-precision", choices=PRECISIONS, default=os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),
                   help="autocast as in training (auto: bf16 where the hardware has native bf16 matmuls); "
                        "default: accelerate launch's --mixed_precision, else no")
    a = p.parse_args(argv)
    if a.mixed_precision not in PRECISIONS:  # an environment default argparse does not check
        p.error(f"--mixed-precision {a.mixed_precision!r}: one of {', '.join(PRECISIONS)}")
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
    partitioned = zero3_run()
    # ZeRO-3: every rank builds its partition streamed from the safetensors files; no rank holds the LLM whole
    tok, model, meta = load_export(model_dir, zero3=partitioned)
    share = 1.0  # of the LLM's parameters this rank holds
    if partitioned:
        engine = zero3_inference_engine(model, state)  # its hooks gather each module's parameters at its forward
        params = list(model.llm.parameters())
        share = sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params)
    else:
        model.to(state.device)
    ds = dataset_for(meta, a.data, tok)
    rows = list(range(len(ds) if a.limit is None else min(a.limit, len(ds))))
    # partitioned: every forward is a collective, so each rank runs as many batches as the rank with most rows
    most = -(-len(rows) // state.num_processes)
    precision = resolve_precision(a.mixed_precision)
    # contiguous slices, in rank order
    with state.split_between_processes(rows) as mine, autocast(precision, state.device.type):
        preds = predict(model, tok, ds, list(mine), a.batch_size, min_batches=-(-most // a.batch_size) if partitioned else 0,
                        max_new_tokens=a.max_new_tokens, num_beams=a.num_beams)
    if partitioned:
        state.free_memory(engine)
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
                          "model": model_dir, "num_processes": state.num_processes,
                          "mixed_precision": precision, "model_on_each_rank": "zero3_partition" if partitioned else "whole",
                          "llm_share_per_rank": round(share, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
