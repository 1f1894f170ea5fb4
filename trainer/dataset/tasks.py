"""Task data in one call: source file -> Mol-Instructions JSONL (trainer.converters) -> shards (graph.preprocess).

    folder = prepare("molcap", "data/chebi20/train.txt", "runs/data")   # runs/data/molcap_train/
Reruns reuse finished work: the JSONL is rewritten only when missing, and preprocessing resumes.
OUT_ROOT/NAME.conversion.json keeps the conversion's row counts and rejects; `record_overlap` (called by
`prepare_shipped` for a held-out split) writes the train/test overlap figure (trainer.data) to a report file.
"""
from __future__ import annotations

import contextlib
import json
import os

from graph.atomic import atomic_write_json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The shipped samples (data/) each task is built from; reagent's is synthetic (tests and demo only).
SHIPPED = {
    "molcap": ("data/chebi20/train.txt", "data/chebi20/test.txt"),
    "forward": ("data/uspto50k/train.csv", "data/uspto50k/test.csv"),
    "retrosynthesis": ("data/uspto50k/train.csv", "data/uspto50k/test.csv"),
    "reagent": ("data/reagent_sample/reactions.csv", "data/reagent_sample/held_out.csv"),
}


def prepare(task: str, source: str, out_root: str, name: str | None = None, limit: int | None = None,
            progress: bool = False) -> str:
    """Convert `source` for `task` and preprocess it into OUT_ROOT/NAME (default: the task name)."""
    from ..converters import run as convert

    name = name or task
    os.makedirs(out_root, exist_ok=True)
    jsonl, folder = os.path.join(out_root, f"{name}.jsonl"), os.path.join(out_root, name)
    if not os.path.exists(jsonl):
        summary = convert(task, source, jsonl, limit=limit, progress=progress)
        atomic_write_json(summary, conversion_path(out_root, name))  # row counts and rejects, for reports
    preprocess(jsonl, folder, progress)
    return folder


def conversion_path(out_root: str, name: str) -> str:
    return os.path.join(out_root, f"{name}.conversion.json")


def preprocess(jsonl: str, folder: str, progress: bool = False) -> dict:
    """Instruction records to shards (graph.preprocess; a rerun resumes); the manifest."""
    from graph.preprocess import run

    with _ray():
        return run(jsonl, folder, fmt="instructions", progress=progress)


def record_overlap(train: dict, held_out: dict, path: str) -> dict:
    """{name: overlap figure} of each held-out folder against all `train` folders ({name: folder} both), also
    written to PATH (JSON, merged with what PATH held). See trainer.data.overlap."""
    from ..data import overlap, summary_line

    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    for name, folder in held_out.items():
        r = overlap(list(train.values()), folder)
        results[name] = {**r, "summary": summary_line(r, name)}
    atomic_write_json(results, path)
    return results


def prepare_shipped(out_root: str, tasks=("molcap", "forward", "retrosynthesis"), split: str = "train") -> dict:
    """{task: preprocessed folder} for the shipped samples of each task (one Ray cluster for all). A held-out
    split whose training folder is built too gets its train/test overlap into OUT_ROOT/overlap.json."""
    k = 0 if split == "train" else 1
    with _ray():
        folders = {t: prepare(t, os.path.join(ROOT, SHIPPED[t][k]), out_root, f"{t}_{split}") for t in tasks}
    if split != "train":
        for t, folder in folders.items():
            train = os.path.join(out_root, f"{t}_train")
            if os.path.exists(os.path.join(train, "manifest.json")):
                record_overlap({f"{t}_train": train}, {f"{t}_{split}": folder}, overlap_path(out_root))
    return folders


def overlap_path(out_root: str) -> str:
    return os.path.join(out_root, "overlap.json")


@contextlib.contextmanager
def _ray():
    """A Ray connection for the block: the caller's if it has one, else a local cluster shut down after."""
    from graph.preprocess import connect_ray

    owner = connect_ray()
    try:
        yield
    finally:
        if owner:
            import ray

            ray.shutdown()
