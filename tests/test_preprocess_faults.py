"""graph.preprocess survives lost workers: one real multi-raylet Ray cluster, real SIGKILLs, a removed node.

Each job is the real CLI attached to the cluster; each must exit 0 with the output of a one-worker run
on a fresh local Ray (rows, order, rejects, manifest counts and shard layout)."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import DATA, ROOT
from graph.preprocess import TEST_CRASH_ENV, read_table

pytestmark = pytest.mark.slow
CHUNK = 8  # small chunks: many of them, so a fault lands mid-run


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """600 ChEBI-20 rows (train + test), some of them rejects."""
    path = tmp_path_factory.mktemp("src") / "chebi600.txt"
    with open(os.path.join(DATA, "chebi20", "train.txt")) as f, open(os.path.join(DATA, "chebi20", "test.txt")) as g:
        path.write_text(f.read() + "".join(g.readlines()[1:]))
    return str(path)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k != TEST_CRASH_ENV}
    return {**env, **extra}


def _cli(source, out, *args, env=None):
    """The CLI as a background process (stdout/stderr to files: a full pipe must not stall it)."""
    cmd = [sys.executable, "-m", "graph.preprocess", "--input", source, "--output", out, "--chunk-size", str(CHUNK),
           "--no-progress", *args]
    os.makedirs(out, exist_ok=True)
    logs = open(os.path.join(out, "stdout.log"), "w"), open(os.path.join(out, "stderr.log"), "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=logs[0], stderr=logs[1])
    proc.logs = logs
    return proc


def _finish(proc, out, timeout=300):
    """Exit code 0 and the CLI's final JSON line."""
    rc = proc.wait(timeout=timeout)
    for f in proc.logs:
        f.close()
    with open(os.path.join(out, "stderr.log")) as f:
        err = f.read()
    assert rc == 0, err[-3000:]
    with open(os.path.join(out, "stdout.log")) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def _output(out):
    """What a clean run must reproduce: rows in order, rejects, manifest counts and shard layout."""
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    with open(os.path.join(out, "rejects.jsonl")) as f:
        rejects = [json.loads(line) for line in f]
    keys = ("input_rows", "accepted", "rejected", "rejected_by_reason", "shards")
    return read_table(out), rejects, {k: m[k] for k in keys}


def _summaries(out):
    d = os.path.join(out, "_chunks")
    names = [n for n in os.listdir(d) if n[:6].isdigit() and n.endswith(".json")] if os.path.isdir(d) else []
    found = []
    for n in names:
        try:
            with open(os.path.join(d, n)) as f:
                found.append(json.load(f))
        except (OSError, ValueError):
            pass
    return found


def _wait_chunks(proc, out, n, timeout=120):
    deadline = time.time() + timeout
    while len(_summaries(out)) < n and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None and len(_summaries(out)) >= n, "the job did not get going (or ended already)"


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    """A clean one-worker run on its own local Ray cluster."""
    out = str(tmp_path_factory.mktemp("ref") / "out")
    m = _finish(_cli(source, out, "--workers", "1"), out)
    assert (m["retries"], m["lost_workers"]) == (0, 0)
    return _output(out)


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs and two 1-CPU raylets: every actor lives on a worker node."""
    from ray.cluster_utils import Cluster

    store = 96 * 1024 * 1024
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                       "object_store_memory": store})
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=store)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()


def _raylet_pids(cluster):
    return {n.all_processes["raylet"][0].process.pid for n in cluster.list_all_nodes()}


def test_killed_actor_is_replaced(source, reference, cluster, tmp_path):
    out = str(tmp_path / "out")
    proc = _cli(source, out, "--ray-address", cluster.address)
    _wait_chunks(proc, out, 8)
    raylets = _raylet_pids(cluster)
    victims = [s["pid"] for s in _summaries(out) if psutil.pid_exists(s["pid"])
               and raylets & {p.pid for p in psutil.Process(s["pid"]).parents()}]  # only this cluster's workers
    assert victims, "no live actor of this job found"
    os.kill(victims[0], signal.SIGKILL)
    m = _finish(proc, out)
    assert m["lost_workers"] >= 1 and m["retries"] >= 1
    table, rejects, manifest = _output(out)
    assert table.equals(reference[0])  # same rows, same order, no row twice
    assert (rejects, manifest) == reference[1:]


def test_molecule_that_kills_its_worker_is_isolated(source, reference, cluster, tmp_path):
    ref_table, ref_rejects, ref_manifest = reference
    with open(source) as f:
        rows = [line.rstrip("\n").split("\t") for line in f.readlines()[1:]]
    smiles = [r[1] for r in rows]
    poison = next(i for i in ref_table.column("row").to_pylist() if i >= 300 and smiles.count(smiles[i]) == 1)
    out = str(tmp_path / "out")
    proc = _cli(source, out, "--ray-address", cluster.address, "--max-retries", "1",
                env=_env(**{TEST_CRASH_ENV: smiles[poison]}))
    m = _finish(proc, out)
    # chunk of 8: 2 tries, then pieces of 4 and 2 one try each, then the lone row 2 tries
    assert m["lost_workers"] >= 6 and m["bisected_chunks"] == 1
    assert m["rejected_by_reason"]["worker_crash"] == 1
    table, rejects, manifest = _output(out)
    keep = [i for i, r in enumerate(ref_table.column("row").to_pylist()) if r != poison]
    assert table.equals(ref_table.take(keep))
    crash = [r for r in rejects if r["reason"] == "worker_crash"]
    assert [(r["row"], r["input"]) for r in crash] == [(poison, "\t".join(rows[poison]))]
    assert [r for r in rejects if r["reason"] != "worker_crash"] == ref_rejects
    assert [r["row"] for r in rejects] == sorted(r["row"] for r in rejects)  # row order kept
    assert manifest["accepted"] + manifest["rejected"] == manifest["input_rows"] == ref_manifest["input_rows"]
    assert manifest["rejected_by_reason"] == {**ref_manifest["rejected_by_reason"], "worker_crash": 1}
    shard = poison // CHUNK
    expected = [dict(s, rows=s["rows"] - (k == shard)) for k, s in enumerate(ref_manifest["shards"])]
    assert manifest["shards"] == expected  # the bisected chunk is one shard again, one row short


def test_lost_node(source, reference, cluster, tmp_path):
    """A whole worker node goes (its raylet and workers killed); the job finishes on the other one."""
    out = str(tmp_path / "out")
    proc = _cli(source, out, "--ray-address", cluster.address)
    _wait_chunks(proc, out, 8)
    used = {s["node_id"] for s in _summaries(out)}
    node = next(n for n in cluster.worker_nodes if n.node_id in used)
    cluster.remove_node(node, allow_graceful=False)
    m = _finish(proc, out)
    assert m["lost_workers"] >= 1 and m["retries"] >= 1
    table, rejects, manifest = _output(out)
    assert table.equals(reference[0])
    assert (rejects, manifest) == reference[1:]
