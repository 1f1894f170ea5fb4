"""`python -m benchmarks.encoder`: the hierarchical encoder against a plain PyG GIN, and (later) what
its pre-training objectives reach.

Part 1, speed (`speed_ratio_vs_pyg_gin`): forward + backward throughput, in graphs/s, of
`HierarchicalEncoder` (5 layers, 300 wide, atoms + motifs + graph node) on batches of ChEBI-20
validation molecules, against `torch_geometric.nn.models.GIN(300, 300, 5)` with the same summed atom
feature embedding in front, on the same molecules' atom-only graphs. Batches are collated before
timing (collation is the data loader's cost, not the encoder's); the models alternate batch by batch
so machine load hits them alike.

What to expect: the hierarchical graph has ~20% more nodes and ~2x the edges, and MoleculeSTM's GINE
MLP is 2x wide, so its dense MLP work is ~2.4x the baseline's (`mlp_flops_ratio_hier_over_gin`); on a
CPU, where the MLP matmuls dominate both models, that caps the ratio near 1 / 2.4 plus whatever our
sparse aggregation wins back over PyG's scatter. The control `speed_ratio_vs_pyg_gin_mlp1x` (same
encoder, 1x MLP, GIN's width) separates that architectural cost from the implementation's.

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
                           warmup: int = 2, seed: int = 0, control: bool = True) -> dict:
    """Forward + backward graphs/s of the hierarchical encoder vs PyG GIN on the same molecules.

    `control` also times the hierarchical encoder with a 1x-wide MLP (PyG GIN's width): the gap
    between the two ratios is the cost of MoleculeSTM's 2x MLP, the rest is the hierarchy and our
    message passing.
    """
    torch.manual_seed(seed)
    graphs = chebi_graphs(n_batches * batch_size)
    chunks = [graphs[i:i + batch_size] for i in range(0, len(graphs), batch_size)]
    hier_batches = [Batch.from_data_list([to_pyg(g) for g in c]) for c in chunks]
    atom_batches = [Batch.from_data_list([to_pyg_atoms_only(g) for g in c]) for c in chunks]
    models = {  # name -> (model, batches, hierarchical)
        "hier": (HierarchicalEncoder(EncoderConfig(num_layers=5, hidden=300)).train(), hier_batches, True),
        "gin": (AtomGIN(300, 5).train(), atom_batches, False),
    }
    if control:
        models["hier_mlp1x"] = (HierarchicalEncoder(EncoderConfig(num_layers=5, hidden=300, mlp_ratio=1)).train(),
                                hier_batches, True)
    for i in range(warmup):
        for model, batches, hierarchical in models.values():
            _train_step(model, batches[i % n_batches], hierarchical)
    seconds = dict.fromkeys(models, 0.0)
    for r in range(rounds):
        for i in range(n_batches):  # alternate batch by batch: load changes hit every model alike
            for name, (model, batches, hierarchical) in models.items():
                seconds[name] += _train_step(model, batches[i], hierarchical)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items()))
    n = rounds * n_batches * batch_size
    gps = {k: n / v for k, v in seconds.items()}
    out = {
        "speed_ratio_vs_pyg_gin": round(gps["hier"] / gps["gin"], 4),
        "hier_graphs_per_s": round(gps["hier"], 2),
        "gin_graphs_per_s": round(gps["gin"], 2),
    }
    if control:
        out["speed_ratio_vs_pyg_gin_mlp1x"] = round(gps["hier_mlp1x"] / gps["gin"], 4)
    # The dense work both models cannot avoid: per layer and node, the MLP's multiply-adds.
    hier_cfg, h = models["hier"][0].cfg, 300
    hier_macs = sum(b.num_nodes for b in hier_batches) * 2 * h * h * hier_cfg.mlp_ratio
    gin_macs = sum(b.num_nodes for b in atom_batches) * 2 * h * h
    out["mlp_flops_ratio_hier_over_gin"] = round(hier_macs / gin_macs, 3)
    out.update({
        "speed_batch_size": batch_size,
        "speed_batches_timed": rounds * n_batches,
        "hier_nodes_per_batch": round(sum(b.num_nodes for b in hier_batches) / n_batches, 1),
        "hier_edges_per_batch": round(sum(b.num_edges for b in hier_batches) / n_batches, 1),
        "gin_nodes_per_batch": round(sum(b.num_nodes for b in atom_batches) / n_batches, 1),
        "gin_edges_per_batch": round(sum(b.num_edges for b in atom_batches) / n_batches, 1),
        "torch_threads": torch.get_num_threads(),
    })
    return out


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
