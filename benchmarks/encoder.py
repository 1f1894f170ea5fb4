"""`python -m benchmarks.encoder`: the hierarchical encoder against a plain PyG GIN, and (later) what
its pre-training objectives reach.

Part 1, speed (`speed_ratio_vs_pyg_gin`): forward + backward throughput, in graphs/s, of
`HierarchicalEncoder` (5 layers, 300 wide, atoms + motifs + graph node) on batches of ChEBI-20
validation molecules, against `torch_geometric.nn.models.GIN(300, 300, 5)` with the same summed atom
feature embedding in front, on the same molecules' atom-only graphs. The hierarchical graph has more
nodes and about twice the edges, and its GINE MLP is twice as wide (MoleculeSTM), so a ratio near 1
means our message passing makes up for the extra work. Batches are collated before timing (collation
is the data loader's cost, not the encoder's); the two models alternate batch by batch so machine load
hits both alike.

Each measurement is its own function returning a dict; `main()` merges them and prints one JSON
object as the last stdout line (more measurements, e.g. trained retrieval / SSL accuracy, are added
to `MEASUREMENTS`). Progress goes to stderr. `--quick` uses fewer batches for a smoke run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch_geometric.data import Batch
from torch_geometric.nn import global_mean_pool
from torch_geometric.nn.models import GIN

from graph.chem import Reject, Standardizer
from graph.dataset import to_pyg, to_pyg_atoms_only
from graph.encoder import AtomEmbedding, EncoderConfig, HierarchicalEncoder
from graph.hierarchy import MolGraph, mol_to_graph

CHEBI_VALIDATION = os.environ.get("M3MOL_CHEBI_VALIDATION", "/work/shared/data/chebi20/validation.txt")
TARGETS = {"speed_ratio_vs_pyg_gin_min": 0.7}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def chebi_graphs(n: int, path: str = CHEBI_VALIDATION) -> list[MolGraph]:
    """The first n ChEBI-20 molecules (TSV: CID, SMILES, description) that standardise, as graphs."""
    std, out = Standardizer(), []
    with open(path, encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                continue
            try:
                out.append(mol_to_graph(std.parent(parts[1])))
            except Reject:
                continue
            if len(out) == n:
                break
    if len(out) < n:
        raise SystemExit(f"{path}: only {len(out)} usable molecules, {n} wanted")
    return out


class AtomGIN(torch.nn.Module):
    """The baseline: the same atom feature embedding, then PyG's GIN on the plain molecular graph."""

    def __init__(self, hidden: int = 300, num_layers: int = 5):
        super().__init__()
        self.emb = AtomEmbedding(EncoderConfig().atom_vocab, hidden)
        self.gin = GIN(in_channels=hidden, hidden_channels=hidden, num_layers=num_layers)

    def forward(self, batch) -> torch.Tensor:
        return global_mean_pool(self.gin(self.emb(batch.x), batch.edge_index), batch.batch, batch.num_graphs)


def _train_step(model, batch, hierarchical: bool) -> float:
    """Seconds for one forward + backward (gradients zeroed first, no optimiser step)."""
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    out = model(batch)
    graph = out.graph if hierarchical else out
    graph.pow(2).mean().backward()
    return time.perf_counter() - t


def speed_ratio_vs_pyg_gin(n_batches: int = 8, batch_size: int = 128, rounds: int = 3,
                           warmup: int = 2, seed: int = 0) -> dict:
    """Forward + backward graphs/s of the hierarchical encoder vs PyG GIN on the same molecules."""
    torch.manual_seed(seed)
    graphs = chebi_graphs(n_batches * batch_size)
    chunks = [graphs[i:i + batch_size] for i in range(0, len(graphs), batch_size)]
    hier_batches = [Batch.from_data_list([to_pyg(g) for g in c]) for c in chunks]
    atom_batches = [Batch.from_data_list([to_pyg_atoms_only(g) for g in c]) for c in chunks]
    hier = HierarchicalEncoder(EncoderConfig(num_layers=5, hidden=300)).train()
    gin = AtomGIN(300, 5).train()
    for i in range(warmup):
        _train_step(hier, hier_batches[i % n_batches], True)
        _train_step(gin, atom_batches[i % n_batches], False)
    t_hier = t_gin = 0.0
    for r in range(rounds):
        for hb, ab in zip(hier_batches, atom_batches):
            t_hier += _train_step(hier, hb, True)
            t_gin += _train_step(gin, ab, False)
        log(f"round {r + 1}/{rounds}: hier {t_hier:.2f}s, gin {t_gin:.2f}s so far")
    n = rounds * n_batches * batch_size
    hier_gps, gin_gps = n / t_hier, n / t_gin
    return {
        "speed_ratio_vs_pyg_gin": round(hier_gps / gin_gps, 4),
        "hier_graphs_per_s": round(hier_gps, 2),
        "gin_graphs_per_s": round(gin_gps, 2),
        "speed_batch_size": batch_size,
        "speed_batches_timed": rounds * n_batches,
        "hier_nodes_per_batch": round(sum(b.num_nodes for b in hier_batches) / n_batches, 1),
        "hier_edges_per_batch": round(sum(b.num_edges for b in hier_batches) / n_batches, 1),
        "gin_nodes_per_batch": round(sum(b.num_nodes for b in atom_batches) / n_batches, 1),
        "gin_edges_per_batch": round(sum(b.num_edges for b in atom_batches) / n_batches, 1),
        "torch_threads": torch.get_num_threads(),
    }


# name -> (function, full kwargs, quick kwargs); main() runs them in order and merges their dicts.
MEASUREMENTS = {
    "speed": (speed_ratio_vs_pyg_gin, {"n_batches": 8, "rounds": 3}, {"n_batches": 2, "rounds": 1}),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--only", nargs="*", choices=list(MEASUREMENTS), help="run only these measurements")
    args = ap.parse_args(argv)
    results: dict = {}
    for name, (fn, full, quick) in MEASUREMENTS.items():
        if args.only and name not in args.only:
            continue
        log(f"{name} ...")
        results.update(fn(**(quick if args.quick else full)))
    results["targets"] = TARGETS
    print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
