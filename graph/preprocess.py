"""`python -m graph.preprocess`: raw molecules to hierarchical-graph Parquet shards, fanned out on Ray.

The driver streams the input and cuts it into fixed-size chunks (chunk k = rows [k*C, (k+1)*C)); Ray
actors, each holding its standardiser and writer, turn a chunk into `shard-k.parquet` plus a small
`_chunks/k.json` summary (counts and that chunk's rejects), both written atomically, the summary
last. A chunk is done when its summary exists, so a rerun into the same folder redoes only missing
chunks; chunking does not depend on the worker count, so the output does not either.

Lost workers: an actor process that dies (SIGKILL, OOM, segfault) or goes with its node fails only
the chunks it held; the driver (`_Pool`) resubmits them to the other actors and starts a replacement.
The chunk that was running is charged one attempt; after `max_retries` retries it is bisected, and a
single molecule that still kills its worker becomes a `worker_crash` reject. A bisected chunk is put
back together by the driver into the same shard a clean run writes.

Writes OUTPUT/manifest.json (input_rows, accepted, rejected, rejected_by_reason, shards, settings, and
this run's retries / lost_workers / bisected_chunks) and OUTPUT/rejects.jsonl (row, input, reason,
detail), merged in row order from the chunk summaries.
"""
from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import itertools
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

import pyarrow.parquet as pq

from . import chem
from .formats import FORMATS, InputError, Source
from .atomic import atomic_write_json, atomic_write_parquet, atomic_writer
from .records import ChunkBuilder, RowProcessor, _show, process_chunk

SHARD_VERSION = 2  # bump when the shard schema or the chemistry changes: old folders are not resumed
MAX_RETRIES = 2  # per chunk (and per isolated molecule) after a lost worker, before bisecting / rejecting
# TEST ONLY: a worker meeting a record with this exact field kills its own process (fault-tolerance tests)
TEST_CRASH_ENV = "M3MOL_TEST_CRASH_ON_INPUT"
START_TIMEOUT_S = 300  # no live actor and none started for this long: the cluster has no room, stop


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:06d}.parquet"


def _chunk_summary_path(out: str, chunk: int) -> str:
    return os.path.join(out, "_chunks", f"{chunk:06d}.json")


def write_chunk(out: str, chunk: int, first_row: int, rows: int, table, rejects: list[dict], node_id: str) -> dict:
    """Shard then summary, both atomic (a chunk written twice is still one whole shard); the counts back."""
    atomic_write_parquet(table, os.path.join(out, shard_name(chunk)))
    summary = {"chunk": chunk, "first_row": first_row, "rows": rows, "accepted": table.num_rows,
               "node_id": node_id, "pid": os.getpid(),
               "rejected_by_reason": dict(collections.Counter(r["reason"] for r in rejects)), "rejects": rejects}
    atomic_write_json(summary, _chunk_summary_path(out, chunk))
    del summary["rejects"]  # the driver only needs the counts
    return summary


class ChunkWorker:
    """One Ray actor: holds a row processor (standardiser objects) and writes whole shards."""

    def __init__(self, out: str, fmt: str, context: dict, limits: dict, crash_on: str | None = None):
        import ray

        self.out = out
        self.processor = RowProcessor(fmt, context, chem.Limits(**limits))
        self.node_id = ray.get_runtime_context().get_node_id()  # recorded per chunk: where it ran
        self.crash_on = crash_on

    def ready(self) -> bool:
        return True

    def process(self, chunk: int, first_row: int, records: list) -> dict:
        self._test_crash(records)
        table, rejects = process_chunk(self.processor, first_row, records)
        return write_chunk(self.out, chunk, first_row, len(records), table, rejects, self.node_id)

    def process_rows(self, first_row: int, records: list):
        """Part of a bisected chunk: the rows go back to the driver, which writes the chunk's shard."""
        self._test_crash(records)
        return process_chunk(self.processor, first_row, records)

    def _test_crash(self, records: list) -> None:
        if self.crash_on is not None and any(_has_field(r, self.crash_on) for r in records):
            os.kill(os.getpid(), signal.SIGKILL)  # as a segfaulting RDKit call would end the process


def _has_field(rec, text: str) -> bool:
    fields = rec.values() if isinstance(rec, dict) else rec if isinstance(rec, (list, tuple)) else (rec,)
    return text in fields


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
        # address="local": a new cluster, even when `ray start` left one running on this machine
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 1024 * 1024)
    return True


class WorkerPoolError(RuntimeError):
    """The cluster cannot run the job at all (actors fail in __init__, or none can be placed)."""


def run(input: str, output: str, fmt: str = "auto", ray_address: str | None = None, workers: int | None = None,
        chunk_size: int = 1000, smiles_column: str | None = None, min_heavy_atoms: int = 5,
        max_heavy_atoms: int | None = None, progress: bool = True, max_retries: int = MAX_RETRIES) -> dict:
    if chunk_size < 1:
        raise InputError("--chunk-size must be >= 1")
    if max_retries < 0:
        raise InputError("--max-retries must be >= 0")
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
        args = (os.path.abspath(output), src.fmt, src.context, limits, os.environ.get(TEST_CRASH_ENV) or None)
        pool = _Pool(ray, lambda: actor_cls.remote(*args), n_workers, output, src.fmt, max_retries, progress)
        try:
            summaries = _drive(pool, src, output, chunk_size)
        finally:
            pool.close()
    finally:
        if started:
            ray.shutdown()
    elapsed = time.time() - start
    return _finish(output, summaries, settings, n_workers, elapsed, pool.faults)


def _drive(pool: "_Pool", src: Source, output: str, chunk_size: int) -> list[dict]:
    """Stream chunks to the pool, skipping finished chunks; the input is read as the pool has room."""
    records = iter(src.records())
    for chunk in itertools.count():
        batch = list(itertools.islice(records, chunk_size))
        if not batch:
            break
        done = _load_done(output, chunk)
        if done is not None and done["rows"] == len(batch):
            pool.summaries[chunk] = done
            pool.bar.update(len(batch))
            continue
        pool.submit(_Piece(chunk, chunk * chunk_size, batch, whole=True))
    pool.drain()
    return [pool.summaries[k] for k in sorted(pool.summaries)]


@dataclass
class _Piece:
    """Rows to process: a whole chunk (the actor writes its shard) or part of a bisected one."""
    chunk: int
    first_row: int
    records: list
    whole: bool
    attempts: int = 0  # runs that lost their worker


class _Pool:
    """Ray actors fed with pieces, at most two in flight per actor, that survives lost actors and nodes.

    Actor tasks run in submission order, so when an actor dies the oldest piece it still held was the
    one running: only that piece is charged an attempt; the others it held go back to the queue as they
    were. (The oldest may in fact have finished with its reply lost in the crash: a charged piece then
    runs alone, so an innocent chunk is misjudged at most once.) Every piece is charged at most a
    bounded number of times, so the job always ends.
    """

    def __init__(self, ray, make_actor, n: int, output: str, fmt: str, max_retries: int, progress: bool):
        from tqdm import tqdm

        exc = ray.exceptions
        # a worker process or its node (or a result stored there) is gone: redo the work elsewhere
        self.lost_errors = (exc.RayActorError, exc.WorkerCrashedError, exc.OutOfMemoryError, exc.NodeDiedError,
                            exc.ObjectLostError)
        self.ray, self.make_actor, self.output, self.fmt, self.max_retries = ray, make_actor, output, fmt, max_retries
        self.ids = itertools.count()
        self.seq = itertools.count()
        self.actors = {next(self.ids): make_actor() for _ in range(n)}  # used at once: tasks queue until ready
        self.load = dict.fromkeys(self.actors, 0)  # pieces in flight per live actor (at most 2)
        self.solo: set = set()  # actors running a piece alone
        self.starting: dict = {}  # ready() future of a replacement -> (id, handle)
        self.in_flight: dict = {}  # future -> (actor id, submission number, piece)
        self.queue: collections.deque = collections.deque()
        self.parts: dict[int, dict] = {}  # bisected chunk -> rows missing, rows, [(first_row, table, rejects)]
        self.summaries: dict[int, dict] = {}
        self.faults = {"retries": 0, "lost_workers": 0, "bisected_chunks": 0}
        self.failed_starts = 0  # replacements lost before they were ready, in a row
        self.max_failed_starts = 3 * n + 3
        self.bar = tqdm(unit="mol", desc="preprocess", disable=not progress, smoothing=0.1, file=sys.stderr)

    def submit(self, piece: _Piece) -> None:
        self.queue.append(piece)
        self._dispatch()
        while self.queue:  # full: wait for room before reading more input
            self._step(block=True)
        self._step(block=False)

    def drain(self) -> None:
        while self.queue or self.in_flight:
            self._step(block=True)
        self.bar.close()

    def close(self) -> None:
        for handle in [*self.actors.values(), *(h for _, h in self.starting.values())]:
            self.ray.kill(handle)

    def _dispatch(self) -> None:
        while self.queue:
            p = self.queue[0]
            # a piece that lost a worker before runs alone on its actor: a death then charges it exactly
            alone = p.attempts > 0 or not p.whole
            free = [k for k, n in self.load.items() if k not in self.solo and n < (1 if alone else 2)]
            if not free:
                return
            key = min(free, key=self.load.get)
            self.queue.popleft()
            actor = self.actors[key]
            fut = (actor.process.remote(p.chunk, p.first_row, p.records) if p.whole
                   else actor.process_rows.remote(p.first_row, p.records))
            self.in_flight[fut] = (key, next(self.seq), p)
            self.load[key] += 1
            if alone:
                self.solo.add(key)

    def _step(self, block: bool) -> None:
        waiting = [*self.in_flight, *self.starting]
        if not waiting:
            if self.queue:
                raise WorkerPoolError("no Ray worker left and none could be started")
            return
        # blocked on replacements alone: bounded, so a cluster with no room left ends with an error
        timeout = 0 if not block else None if self.in_flight else START_TIMEOUT_S
        ready, _ = self.ray.wait(waiting, num_returns=1, timeout=timeout)
        if block and not ready:
            raise WorkerPoolError(f"no Ray worker could be started in {START_TIMEOUT_S} s "
                                  f"(every actor was lost and the cluster has no free CPU)")
        for fut in ready:
            if fut in self.starting:
                self._started(fut)
            else:
                self._finished(fut)
        self._dispatch()

    def _get(self, fut):
        """The result, or None when the worker (or its node) was lost; an actor that cannot even start
        (its __init__ raises: missing package, unreadable folder) is a setup error, not a lost worker."""
        try:
            return self.ray.get(fut)
        except self.ray.exceptions.RayActorError as e:
            if e.actor_init_failed:
                first_line = str(e).splitlines()[0][:500]
                raise WorkerPoolError(f"a preprocessing actor failed to start: {first_line}") from None
            return None
        except self.lost_errors:
            return None
        except self.ray.exceptions.ActorUnschedulableError as e:
            raise WorkerPoolError(f"no Ray node can host a preprocessing actor: {str(e)[:500]}") from None

    def _started(self, fut) -> None:
        key, handle = self.starting.pop(fut)
        if self._get(fut) is None:
            self.faults["lost_workers"] += 1
            self.failed_starts += 1
            if self.failed_starts > self.max_failed_starts:
                raise WorkerPoolError(f"{self.failed_starts} replacement actors in a row were lost before they "
                                      "were ready: the cluster keeps losing workers")
            self._replace()
            return
        self.failed_starts = 0
        self.actors[key] = handle
        self.load[key] = 0

    def _replace(self) -> None:
        handle = self.make_actor()
        self.starting[handle.ready.remote()] = (next(self.ids), handle)
        self._show_faults()

    def _finished(self, fut) -> None:
        key, seq, piece = self.in_flight.pop(fut)
        self.load[key] -= 1
        self.solo.discard(key)  # a solo actor held only this piece
        result = self._get(fut)
        if result is not None:
            self._done(piece, result)
            return
        # the actor is gone: settle every piece it held, charge the one that was running
        held = [(seq, piece)]
        for f, (k, s, p) in list(self.in_flight.items()):
            if k != key:
                continue
            del self.in_flight[f]
            got = self._get(f) if self.ray.wait([f], timeout=0)[0] else None
            if got is None:
                held.append((s, p))
            else:
                self._done(p, got)
        held.sort(key=lambda sp: sp[0])
        for _, p in reversed(held[1:]):
            self.queue.appendleft(p)
        self.faults["retries"] += len(held) - 1
        self._charge(held[0][1])
        self.ray.kill(self.actors.pop(key))  # it may only be unreachable: make sure it writes nothing more
        del self.load[key]
        self.faults["lost_workers"] += 1
        self._replace()

    def _charge(self, p: _Piece) -> None:
        p.attempts += 1
        single = len(p.records) == 1
        if p.attempts <= (self.max_retries if p.whole or single else 0):
            self.queue.appendleft(p)
            self.faults["retries"] += 1
        elif single:  # this molecule kills its worker every time
            reject = {"row": p.first_row, "input": _show(p.records[0]), "reason": chem.WORKER_CRASH,
                      "detail": f"the worker process died on this row {p.attempts} times"}
            self._done(p, (None, [reject]))
        else:  # isolate the culprit: halves run on their own (one try each, a lone row gets the retries)
            if p.whole:
                self.parts[p.chunk] = {"missing": len(p.records), "rows": len(p.records), "parts": []}
                self.faults["bisected_chunks"] += 1
            h = len(p.records) // 2
            self.queue.appendleft(_Piece(p.chunk, p.first_row + h, p.records[h:], whole=False))
            self.queue.appendleft(_Piece(p.chunk, p.first_row, p.records[:h], whole=False))
            self.faults["retries"] += 2

    def _done(self, p: _Piece, result) -> None:
        if p.whole:
            self.summaries[p.chunk] = result
            self.bar.update(len(p.records))
            return
        entry = self.parts[p.chunk]
        entry["missing"] -= len(p.records)
        entry["parts"].append((p.first_row, *result))
        if entry["missing"] == 0:  # every row of the bisected chunk is back: write it as a clean run would
            del self.parts[p.chunk]
            self.summaries[p.chunk] = self._write_parts(p.chunk, entry["rows"], entry["parts"])
            self.bar.update(entry["rows"])

    def _write_parts(self, chunk: int, rows: int, parts: list) -> dict:
        import pyarrow as pa

        parts.sort(key=lambda part: part[0])
        tables = [t for _, t, _ in parts if t is not None]
        table = pa.concat_tables(tables).combine_chunks() if tables else ChunkBuilder(self.fmt).table()
        rejects = [r for _, _, rs in parts for r in rs]  # parts in row order, each in row order
        return write_chunk(os.path.abspath(self.output), chunk, parts[0][0], rows, table, rejects,
                           self.ray.get_runtime_context().get_node_id())

    def _show_faults(self) -> None:
        self.bar.set_postfix(retries=self.faults["retries"], lost_workers=self.faults["lost_workers"])


def _load_done(output: str, chunk: int) -> dict | None:
    path = _chunk_summary_path(output, chunk)
    if not (os.path.exists(path) and os.path.exists(os.path.join(output, shard_name(chunk)))):
        return None
    with open(path) as f:
        s = json.load(f)
    s.pop("rejects", None)
    return s


def _finish(output: str, summaries: list[dict], settings: dict, n_workers: int, elapsed: float,
            faults: dict) -> dict:
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
        **faults,  # this run's lost workers and resubmitted pieces (a clean run: zeros)
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
    p.add_argument("--max-retries", type=int, default=MAX_RETRIES, help="retries of a chunk whose worker was "
                   "lost, before it is bisected; a molecule that still kills its worker is a worker_crash reject")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        m = run(a.input, a.output, a.format, a.ray_address, a.workers, a.chunk_size, a.smiles_column,
                a.min_heavy_atoms, a.max_heavy_atoms, progress=not a.no_progress, max_retries=a.max_retries)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerPoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: m[k] for k in ("input_rows", "accepted", "rejected", "rejected_by_reason", "workers",
                                        "elapsed_s", "mol_per_s", "retries", "lost_workers", "bisected_chunks")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
