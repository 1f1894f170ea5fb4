"""`python -m graph.preprocess`: raw molecules to hierarchical-graph Parquet shards, fanned out on Ray.

The driver streams the input and cuts it into fixed-size chunks (chunk k = rows [k*C, (k+1)*C)); Ray
actors, each holding its standardiser and writer, turn a chunk into `shard-k.parquet` plus a small
`_chunks/k.json` summary (counts and that chunk's rejects), both written atomically, the summary
last. A chunk is done when its summary exists, so a rerun into the same folder redoes only missing
chunks; chunking does not depend on the worker count, so the output does not either.

Writes OUTPUT/manifest.json (input_rows, accepted, rejected, rejected_by_reason, shards, settings)
and OUTPUT/rejects.jsonl (row, input, reason, detail), merged in row order from the chunk summaries.
"""
from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import itertools
import json
import os
import sys
import time

import pyarrow.parquet as pq

from . import chem
from .formats import FORMATS, InputError, Source
from .atomic import atomic_write_json, atomic_write_parquet, atomic_writer
from .records import RowProcessor, process_chunk

SHARD_VERSION = 2  # bump when the shard schema or the chemistry changes: old folders are not resumed


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:06d}.parquet"


def _chunk_summary_path(out: str, chunk: int) -> str:
    return os.path.join(out, "_chunks", f"{chunk:06d}.json")


class ChunkWorker:
    """One Ray actor: holds a row processor (standardiser objects) and writes whole shards."""

    def __init__(self, out: str, fmt: str, context: dict, limits: dict):
        import ray

        self.out = out
        self.processor = RowProcessor(fmt, context, chem.Limits(**limits))
        self.node_id = ray.get_runtime_context().get_node_id()  # recorded per chunk: where it ran

    def process(self, chunk: int, first_row: int, records: list) -> dict:
        table, rejects = process_chunk(self.processor, first_row, records)
        atomic_write_parquet(table, os.path.join(self.out, shard_name(chunk)))
        summary = {"chunk": chunk, "first_row": first_row, "rows": len(records), "accepted": table.num_rows,
                   "node_id": self.node_id,
                   "rejected_by_reason": dict(collections.Counter(r["reason"] for r in rejects)), "rejects": rejects}
        atomic_write_json(summary, _chunk_summary_path(self.out, chunk))
        del summary["rejects"]  # the driver only needs the counts
        return summary


def _fingerprint(path: str) -> str:
    """Identifies the input by size and a hash of its first MiB (paths differ across cluster nodes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return f"{os.path.getsize(path)}:{h.hexdigest()[:16]}"


def connect_ray(address: str | None = None, workers: int | None = None) -> bool:
    """Connect to Ray: an existing connection, `address`/RAY_ADDRESS, or a new local cluster sized to
    this machine. True when this call connected (and so must `ray.shutdown()`)."""
    import ray

    if ray.is_initialized():  # a notebook or test that already connected
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # a local cluster sized to this machine (or to --workers)
        cpus = max(workers or 0, os.cpu_count() or 1)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 1024 * 1024)
    return True


def run(input: str, output: str, fmt: str = "auto", ray_address: str | None = None, workers: int | None = None,
        chunk_size: int = 1000, smiles_column: str | None = None, min_heavy_atoms: int = 5,
        max_heavy_atoms: int | None = None, progress: bool = True) -> dict:
    if chunk_size < 1:
        raise InputError("--chunk-size must be >= 1")
    src = Source.open(input, fmt, smiles_column)
    limits = {"min_heavy_atoms": min_heavy_atoms, "max_heavy_atoms": max_heavy_atoms}
    settings = {"version": SHARD_VERSION, "input": os.path.abspath(input), "fingerprint": _fingerprint(input),
                "format": src.fmt, "context": src.context, "chunk_size": chunk_size, "limits": limits}
    os.makedirs(os.path.join(output, "_chunks"), exist_ok=True)
    settings_path = os.path.join(output, "_chunks", "settings.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            old = json.load(f)
        if {k: v for k, v in old.items() if k != "input"} != {k: v for k, v in settings.items() if k != "input"}:
            raise InputError(f"{output} holds a run with other settings or input ({old}); use a new --output folder")
    else:
        atomic_write_json(settings, settings_path)
    for stale in glob.glob(os.path.join(output, "**", "*.tmp-*"), recursive=True):
        os.remove(stale)  # half-written files of a killed run

    import ray

    started = connect_ray(ray_address, workers)
    start = time.time()
    try:
        n_workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor_cls = ray.remote(num_cpus=1)(ChunkWorker)
        actors = [actor_cls.remote(os.path.abspath(output), src.fmt, src.context, limits) for _ in range(n_workers)]
        try:
            summaries = _drive(ray, actors, src, output, chunk_size, progress)
        finally:
            for a in actors:
                ray.kill(a)
    finally:
        if started:
            ray.shutdown()
    elapsed = time.time() - start
    return _finish(output, summaries, settings, n_workers, elapsed)


def _drive(ray, actors: list, src: Source, output: str, chunk_size: int, progress: bool) -> list[dict]:
    """Stream chunks to the actors, at most two in flight per actor, skipping finished chunks."""
    from tqdm import tqdm

    summaries: dict[int, dict] = {}
    in_flight: dict = {}  # future -> actor index
    load = [0] * len(actors)
    bar = tqdm(unit="mol", desc="preprocess", disable=not progress, smoothing=0.1, file=sys.stderr)

    def collect(block: bool) -> None:
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=None if block else 0)
        for fut in ready:
            load[in_flight.pop(fut)] -= 1
            s = ray.get(fut)
            summaries[s["chunk"]] = s
            bar.update(s["rows"])

    records = iter(src.records())
    for chunk in itertools.count():
        batch = list(itertools.islice(records, chunk_size))
        if not batch:
            break
        done = _load_done(output, chunk)
        if done is not None and done["rows"] == len(batch):
            summaries[chunk] = done
            bar.update(len(batch))
            continue
        while len(in_flight) >= 2 * len(actors):
            collect(block=True)
        i = load.index(min(load))
        load[i] += 1
        in_flight[actors[i].process.remote(chunk, chunk * chunk_size, batch)] = i
        collect(block=False)
    while in_flight:
        collect(block=True)
    bar.close()
    return [summaries[k] for k in sorted(summaries)]


def _load_done(output: str, chunk: int) -> dict | None:
    path = _chunk_summary_path(output, chunk)
    if not (os.path.exists(path) and os.path.exists(os.path.join(output, shard_name(chunk)))):
        return None
    with open(path) as f:
        s = json.load(f)
    s.pop("rejects", None)
    return s


def _finish(output: str, summaries: list[dict], settings: dict, n_workers: int, elapsed: float) -> dict:
    reasons: collections.Counter = collections.Counter()
    with atomic_writer(os.path.join(output, "rejects.jsonl")) as f:
        for s in summaries:  # chunk order is row order
            reasons.update(s["rejected_by_reason"])
            if s["rows"] == s["accepted"]:
                continue
            with open(_chunk_summary_path(output, s["chunk"])) as cf:
                for r in json.load(cf)["rejects"]:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    input_rows = sum(s["rows"] for s in summaries)
    accepted = sum(s["accepted"] for s in summaries)
    rejected = sum(reasons.values())
    if accepted + rejected != input_rows:  # cannot happen unless a chunk file was edited by hand
        raise RuntimeError(f"row accounting broken: {accepted} + {rejected} != {input_rows}")
    manifest = {
        "input_rows": input_rows, "accepted": accepted, "rejected": rejected,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "format": settings["format"], "shards": [
            {"file": shard_name(s["chunk"]), "first_row": s["first_row"], "rows": s["accepted"]} for s in summaries
        ],
        "settings": settings, "workers": n_workers, "elapsed_s": round(elapsed, 3),
        "mol_per_s": round(input_rows / elapsed, 1) if elapsed > 0 else None,
    }
    atomic_write_json(manifest, os.path.join(output, "manifest.json"))
    return manifest


def read_table(output: str, columns: list[str] | None = None):
    """All shards of a preprocessed folder as one Arrow table, in input row order (small data only)."""
    import pyarrow as pa

    with open(os.path.join(output, "manifest.json")) as f:
        manifest = json.load(f)
    return pa.concat_tables([pq.read_table(os.path.join(output, s["file"]), columns=columns) for s in manifest["shards"]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graph.preprocess", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="SMILES/CSV/TSV/ChEBI-20/USPTO/JSON(L) file, gzip or not")
    p.add_argument("--output", required=True, help="output folder (on a path every Ray node sees)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    p.add_argument("--ray-address", default=None, help="attach to a running Ray cluster (default: $RAY_ADDRESS, "
                   "else start a local one sized to this machine)")
    p.add_argument("--workers", type=int, default=None, help="Ray actors (default: the cluster's CPUs)")
    p.add_argument("--chunk-size", type=int, default=1000, help="rows per chunk and shard")
    p.add_argument("--smiles-column", default=None, help="CSV/TSV column holding SMILES (default: detected)")
    p.add_argument("--min-heavy-atoms", type=int, default=5, help="reject smaller single molecules (paper: 5)")
    p.add_argument("--max-heavy-atoms", type=int, default=None, help="reject larger molecules (default: no limit)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        m = run(a.input, a.output, a.format, a.ray_address, a.workers, a.chunk_size, a.smiles_column,
                a.min_heavy_atoms, a.max_heavy_atoms, progress=not a.no_progress)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: m[k] for k in ("input_rows", "accepted", "rejected", "rejected_by_reason", "workers",
                                        "elapsed_s", "mol_per_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
