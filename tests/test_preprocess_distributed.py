"""Multi-node and crash behaviour of graph.preprocess, with real Ray clusters and real processes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import DATA, ROOT
from graph.preprocess import read_table, run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_session_ray")]
CHEBI = os.path.join(DATA, "chebi20", "train.txt")


def test_two_raylet_cluster_uses_both_nodes(tmp_path):
    """A Ray cluster with two raylets (two 'nodes' on this machine): actors land on both, same output."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        out = str(tmp_path / "multi")
        m = run(CHEBI, out, workers=2, chunk_size=25, progress=False)
        ray.shutdown()
        nodes = set()
        for name in _chunks_done(out):
            with open(os.path.join(out, "_chunks", name)) as f:
                nodes.add(json.load(f)["node_id"])
        assert len(nodes) == 2  # both raylets processed chunks
    finally:
        ray.shutdown()
        cluster.shutdown()
    single = str(tmp_path / "single")
    m1 = run(CHEBI, single, workers=1, chunk_size=25, progress=False)
    assert (m1["accepted"], m1["rejected"]) == (m["accepted"], m["rejected"])
    assert read_table(out).equals(read_table(single))


def _chunks_done(out):
    d = os.path.join(out, "_chunks")
    # finished chunks only: NNNNNN.json (a kill can leave a NNNNNN.json.tmp-* behind)
    return [n for n in os.listdir(d) if n[:6].isdigit() and n.endswith(".json")] if os.path.isdir(d) else []


def test_resume_after_kill(tmp_path):
    """Kill the whole job halfway (SIGKILL to its process group); the rerun keeps finished shards."""
    src = tmp_path / "in.txt"
    with open(CHEBI) as f, open(os.path.join(DATA, "chebi20", "test.txt")) as g:
        src.write_text(f.read() + "".join(g.readlines()[1:]))  # 600 ChEBI-20 rows
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "graph.preprocess", "--input", str(src), "--output", out, "--workers", "1",
           "--chunk-size", "4", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(_chunks_done(out)) < 20 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(_chunks_done(out))
    assert 20 <= len(done_before) < 150, "the job was not killed halfway"
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    stamps = {n: os.stat(os.path.join(out, "shard-" + n.replace(".json", ".parquet"))).st_mtime_ns for n in done_before}

    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["input_rows"] == 600 and m["accepted"] + m["rejected"] == 600
    for n, t in stamps.items():  # finished shards were kept, not redone
        assert os.stat(os.path.join(out, "shard-" + n.replace(".json", ".parquet"))).st_mtime_ns == t
    assert not [f for f in os.listdir(out) if ".tmp-" in f]

    clean = str(tmp_path / "clean")
    r = subprocess.run([*cmd[:6], clean, *cmd[7:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert read_table(out).equals(read_table(clean))
    with open(os.path.join(out, "rejects.jsonl")) as a, open(os.path.join(clean, "rejects.jsonl")) as b:
        assert a.read() == b.read()
