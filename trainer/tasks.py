"""Task data in one call: source file -> Mol-Instructions JSONL (trainer.converters) -> shards (graph.preprocess).

    folder = prepare("molcap", "data/chebi20/train.txt", "runs/data")   # runs/data/molcap_train/
Reruns reuse finished work: the JSONL is rewritten only when missing, and preprocessing resumes.
"""
from __future__ import annotations

import contextlib
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    from graph.preprocess import run

    from .converters import run as convert

    name = name or task
    os.makedirs(out_root, exist_ok=True)
    jsonl, folder = os.path.join(out_root, f"{name}.jsonl"), os.path.join(out_root, name)
    if not os.path.exists(jsonl):
        convert(task, source, jsonl, limit=limit, progress=progress)
    with _ray():
        run(jsonl, folder, fmt="instructions", progress=progress)
    return folder


def prepare_shipped(out_root: str, tasks=("molcap", "forward", "retrosynthesis"), split: str = "train") -> dict:
    """{task: preprocessed folder} for the shipped samples of each task (one Ray cluster for all)."""
    k = 0 if split == "train" else 1
    with _ray():
        return {t: prepare(t, os.path.join(ROOT, SHIPPED[t][k]), out_root, f"{t}_{split}") for t in tasks}


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
