"""Score a prediction file with the MolT5 / Mol-Instructions metrics (formulas in trainer/metrics.py).

    python -m trainer.evaluate --task {forward,reagent,retrosynthesis,molcap,property,grounding}
        --predictions FILE [--molecule-format auto|selfies|smiles] [--out FILE.json]
        [--text-tokenizer PATH_OR_ID] [--text-trunc-length 512]

FILE is either
  * TSV with a header holding the columns `ground truth` and `output` (MolT5's layout; its files also have
    a first column `SMILES` or `description`), read with csv.QUOTE_NONE since descriptions contain quotes;
    optional columns `metadata` (a JSON object) or `question_type` feed the grounding task;
  * JSONL with one object per line holding `target` and `prediction` (detected by a leading '{'), and
    optionally `metadata` (an object or its JSON text) or a top-level `question_type` / `answer_kind`.
The last line of stdout is one JSON object of metrics (also written to --out), with `semantics`: the
formula each key follows (trainer/metrics.py SEMANTICS). The default keys are the published ones (MolT5);
m3mol's variants have their own names (`bleu_canonical`, ...). A missing file, missing columns/keys, an
empty file or an unknown task exit with status 2 and a message on stderr.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

TASKS = ("forward", "reagent", "retrosynthesis", "molcap", "property", "grounding")
MOLECULE_TASKS = ("forward", "reagent", "retrosynthesis")
TSV_COLUMNS = ("ground truth", "output")
JSONL_KEYS = ("target", "prediction")
META_KEYS = ("question_type", "answer_kind")  # read from a row's top level when it has no metadata


class InputError(Exception):
    """A problem with the prediction file; reported with exit status 2."""


def _text(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def read_predictions(path: str) -> tuple[list[str], list[str], str]:
    """(targets, outputs, layout) from a MolT5 TSV or a JSONL file; raises InputError with a clear message."""
    targets, outputs, _, layout = read_rows(path)
    return targets, outputs, layout


def read_rows(path: str) -> tuple[list[str], list[str], list[dict | None], str]:
    """(targets, outputs, metadata per row (None where absent), layout); see read_predictions."""
    if not os.path.exists(path):
        raise InputError(f"predictions file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"predictions path is a folder, not a file: {path}")
    with open(path, encoding="utf-8-sig", newline="") as f:
        head = f.read(4096)
        f.seek(0)
        layout = "jsonl" if head.lstrip().startswith("{") else "tsv"
        targets, outputs, metas = _read_jsonl(f, path) if layout == "jsonl" else _read_tsv(f, path)
    if not targets:
        raise InputError(f"{path}: no prediction rows")
    return targets, outputs, metas, layout


def _metadata(value, extra: dict, where: str) -> dict | None:
    """A row's metadata dict: an object, or its JSON text (as shards store it), plus top-level META_KEYS."""
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: metadata is not a JSON object ({e.msg})") from None
    meta = dict(value) if isinstance(value, dict) else {}
    meta.update({k: v for k, v in extra.items() if k in META_KEYS and v not in (None, "") and k not in meta})
    return meta or None


def _read_jsonl(f, path):
    targets, outputs, metas = [], [], []
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{n}: expected a JSON object with keys {list(JSONL_KEYS)}")
        missing = [k for k in JSONL_KEYS if k not in row]
        if missing:
            raise InputError(f"{path}:{n}: missing key(s) {missing}; JSONL rows need {list(JSONL_KEYS)}, "
                             f"found {sorted(row)}")
        targets.append(_text(row["target"]))
        outputs.append(_text(row["prediction"]))
        metas.append(_metadata(row.get("metadata"), row, f"{path}:{n}"))
    return targets, outputs, metas


def _read_tsv(f, path):
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if header is None:
        raise InputError(f"{path}: empty file")
    header = [h.strip().lstrip("\ufeff") for h in header]
    missing = [c for c in TSV_COLUMNS if c not in header]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; a TSV needs a header with "
                         f"{list(TSV_COLUMNS)} (found {header}), or use JSONL with {list(JSONL_KEYS)}")
    ti, oi = header.index("ground truth"), header.index("output")
    targets, outputs, metas = [], [], []
    for n, row in enumerate(reader, 2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            raise InputError(f"{path}:{n}: {len(row)} tab-separated fields, header has {len(header)}")
        targets.append(row[ti])
        outputs.append(row[oi])
        fields = dict(zip(header, row))
        metas.append(_metadata(fields.get("metadata"), fields, f"{path}:{n}"))
    return targets, outputs, metas


def compute(task: str, targets: list[str], outputs: list[str], molecule_format: str = "auto",
            text_tokenizer: str | None = None, text_trunc_length: int = 512,
            metadata: list[dict | None] | None = None) -> dict:
    """Dispatch to trainer.metrics for one task: {key: value}, every key of SEMANTICS for the task."""
    from trainer import metrics

    if task in MOLECULE_TASKS:
        return metrics.molecule_metrics(targets, outputs, molecule_format)
    if task == "molcap":
        from transformers import AutoTokenizer

        name = text_tokenizer or metrics.default_text_tokenizer_path()
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # offline hub id, wrong path
            raise InputError(f"cannot load the text tokenizer {name!r} (a local folder, or a hub id when "
                             f"online): {type(e).__name__}: {e}") from None
        return metrics.text_metrics(targets, outputs, tok, max_length=text_trunc_length)
    if task == "property":
        return metrics.property_metrics(targets, outputs)
    if task == "grounding":
        return metrics.grounding_metrics(targets, outputs, metadata)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def report(result: dict, text_tokenizer: str | None = None) -> dict:
    """The printed JSON: the metrics and, under `semantics`, the formula each key follows."""
    from trainer import metrics

    return {**result, "semantics": metrics.semantics(result, text_tokenizer)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--predictions", required=True, help="TSV (`ground truth`, `output`) or JSONL "
                                                         "(`target`, `prediction`)")
    ap.add_argument("--molecule-format", default="auto", choices=("auto", "selfies", "smiles"),
                    help="molecule tasks: decode SELFIES (auto: strings made of bracketed tokens only)")
    ap.add_argument("--out", help="also write the metrics JSON here")
    ap.add_argument("--text-tokenizer", default=None,
                    help="molcap: BERT tokenizer path or hub id for BLEU/METEOR word pieces, e.g. "
                         "allenai/scibert_scivocab_uncased as in MolT5 (default: the offline "
                         "bert-base-uncased vocabulary of the MiniLM package)")
    ap.add_argument("--text-trunc-length", type=int, default=512, help="molcap: word pieces kept per text")
    ap.add_argument("--string-metrics", choices=("canonical", "raw"), help=argparse.SUPPRESS)  # old flag
    args = ap.parse_args(argv)
    if args.string_metrics:
        print("note: --string-metrics is no longer needed: bleu/levenshtein are on the strings as produced "
              "(MolT5), bleu_canonical/levenshtein_canonical on RDKit canonical SMILES, both always reported",
              file=sys.stderr)

    t0 = time.time()
    try:
        targets, outputs, metas, layout = read_rows(args.predictions)
        print(f"read {len(targets)} rows from {args.predictions} ({layout}); task {args.task}", flush=True)
        result = report(compute(args.task, targets, outputs, args.molecule_format, args.text_tokenizer,
                                args.text_trunc_length, metas), args.text_tokenizer)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"scored in {time.time() - t0:.1f} s", flush=True)
    line = json.dumps(result)
    if args.out:
        from graph.atomic import atomic_writer

        with atomic_writer(args.out) as f:
            f.write(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
