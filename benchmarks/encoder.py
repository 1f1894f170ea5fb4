"""`python -m benchmarks.encoder`: the hierarchical encoder against a plain PyG GIN, and what its two
pretraining stages reach on ChEBI-20.

Speed (`speed_ratio_vs_pyg_gin`): forward + backward graphs/s of `HierarchicalEncoder` (5 layers, 300
wide, MoleculeSTM's 2x-wide GINE MLP; atoms + motifs + graph node) on batches of 128 ChEBI-20
validation molecules, over a PyG GIN of the same depth, width and MLP shape (`GINConv` layers) on the
same molecules' atom-only graphs: what is left is the hierarchy's own cost. For transparency also
against `torch_geometric.nn.models.GIN` as shipped, whose MLP is 1x wide (half the dense work):
`speed_ratio_vs_pyg_gin_default_mlp`, and with both 1x wide. Batches are collated before timing; the
models alternate batch by batch so machine load hits them alike.

Trained (`retrieval_top1_*`, `ssl_*`): stage 0a then 0b through trainer/run.py on the ChEBI-20
validation split, retrieval among 64 candidates on the test split, SSL accuracies on held-out
molecules with the majority-class share as chance level.

`main()` prints one JSON object as the last stdout line; progress goes to stderr. `--quick` is a
smoke run (tiny budgets: its accuracies mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch_geometric.data import Batch
from torch_geometric.nn import MLP, GINConv, global_mean_pool
from torch_geometric.nn.models import GIN

from graph.chem import Reject, Standardizer
from graph.dataset import to_pyg, to_pyg_atoms_only
from graph.encoder import AtomEmbedding, EncoderConfig, HierarchicalEncoder
from graph.hierarchy import MolGraph, mol_to_graph

CHEBI_VALIDATION = os.environ.get("M3MOL_CHEBI_VALIDATION", "/work/shared/data/chebi20/validation.txt")
TARGETS = {"speed_ratio_vs_pyg_gin_min": 0.7, "retrieval_top1_min": 0.25, "contrastive_stage_s_max": 600}


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
    """The baseline: the same atom feature embedding, then a PyG GIN on the plain molecular graph.

    mlp_ratio=None is `torch_geometric.nn.models.GIN` as shipped (MLP 1x wide); an integer builds the
    same depth and width from `torch_geometric.nn.GINConv` with an MLP `mlp_ratio` x wide, like ours.
    """

    def __init__(self, hidden: int = 300, num_layers: int = 5, mlp_ratio: int | None = None):
        super().__init__()
        self.emb = AtomEmbedding(EncoderConfig().atom_vocab, hidden)
        self.gin = GIN(in_channels=hidden, hidden_channels=hidden, num_layers=num_layers)
        if mlp_ratio is not None:
            for i in range(num_layers):  # swap each layer's MLP for the wider one, norm kept
                self.gin.convs[i] = GINConv(MLP([hidden, mlp_ratio * hidden, hidden], norm="batch_norm"))

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
        "gin": (AtomGIN(300, 5, mlp_ratio=EncoderConfig().mlp_ratio).train(), atom_batches, False),
        "gin_default": (AtomGIN(300, 5).train(), atom_batches, False),
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
        # like for like: same depth, width and MLP shape; what remains is the hierarchy's own cost
        "speed_ratio_vs_pyg_gin": round(gps["hier"] / gps["gin"], 4),
        "hier_graphs_per_s": round(gps["hier"], 2),
        "gin_graphs_per_s": round(gps["gin"], 2),
        # against torch_geometric.nn.models.GIN as shipped (MLP 1x wide: half our dense work)
        "speed_ratio_vs_pyg_gin_default_mlp": round(gps["hier"] / gps["gin_default"], 4),
    }
    if control:
        out["speed_ratio_vs_pyg_gin_default_mlp_both_1x"] = round(gps["hier_mlp1x"] / gps["gin_default"], 4)
    # The dense work both models cannot avoid: per layer and node, the MLP's multiply-adds.
    hier_cfg, h = models["hier"][0].cfg, 300
    hier_macs = sum(b.num_nodes for b in hier_batches) * 2 * h * h * hier_cfg.mlp_ratio
    gin_macs = sum(b.num_nodes for b in atom_batches) * 2 * h * h * hier_cfg.mlp_ratio  # the matched GIN
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


def _chebi_split(name: str) -> tuple[str, bool]:
    """A ChEBI-20 split file: the full one from ../shared/data when present, else the shipped sample."""
    full = os.path.join(os.path.dirname(CHEBI_VALIDATION), f"{name}.txt")
    if os.path.exists(full):
        return full, True
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "data", "chebi20", "train.txt" if name == "validation" else "test.txt"), False


def trained_metrics(ssl_steps: int = 300, contrastive_steps: int = 600, batch_size: int = 64) -> dict:
    """Stage 0a then 0b through the real entry point (trainer/run.py, one process) on ChEBI-20:
    SSL and contrastive training on the validation split, retrieval measured on the test split
    (blocks of 64 candidates, chance 1/64), SSL accuracies on held-out validation molecules."""
    import subprocess
    import tempfile

    import ray
    import yaml

    from graph.preprocess import connect_ray, run as preprocess

    work = tempfile.mkdtemp(prefix="m3mol-bench-encoder-")
    (train_src, full), (test_src, _) = _chebi_split("validation"), _chebi_split("test")
    connect_ray()
    try:
        for name, src in (("train", train_src), ("test", test_src)):
            m = preprocess(src, os.path.join(work, name), chunk_size=500, progress=False)
            log(f"preprocessed {src}: {m['accepted']} accepted, {m['rejected']} rejected")
    finally:
        ray.shutdown()
    arch = {"num_layers": 5, "hidden": 300}
    recipe = {
        "run_dir": os.path.join(work, "run"), "stages": ["encoder_ssl", "encoder_contrastive"], "log_with": "none",
        "encoder_ssl": {"data": [os.path.join(work, "train")], "encoder": arch,
                        "train": {"batch_size": batch_size, "lr": 1e-3, "warmup_steps": 10, "max_steps": ssl_steps,
                                  "log_every": 25}},
        "encoder_contrastive": {"data": os.path.join(work, "train"), "val_data": os.path.join(work, "test"),
                                "init_encoder": "auto", "encoder": arch,
                                "contrastive": {"freeze_text": True, "max_length": 128, "temperature": 0.1},
                                "train": {"batch_size": batch_size, "lr": 5e-4, "warmup_steps": 20,
                                          "max_steps": contrastive_steps, "log_every": 25}},
    }
    path = os.path.join(work, "recipe.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "trainer", "run.py"), "--config", path],
                       cwd=root, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"training failed ({r.returncode}); recipe {path}")
    st = json.loads(r.stdout.strip().splitlines()[-1])["stages"]
    ssl, con = st["encoder_ssl"], st["encoder_contrastive"]
    return {
        "retrieval_top1_graph_to_text": round(con["eval_g2t_top1"], 4),
        "retrieval_top1_text_to_graph": round(con["eval_t2g_top1"], 4),
        "retrieval_top10_graph_to_text": round(con["eval_g2t_top10"], 4),
        "retrieval_top10_text_to_graph": round(con["eval_t2g_top10"], 4),
        "retrieval_candidates": con["eval_retrieval_pool"], "retrieval_test_pairs": con["eval_retrieval_pairs"],
        "contrastive_train_pairs": con["train_pairs"], "contrastive_steps": con["steps"],
        "contrastive_stage_s": con["elapsed_s"],
        "ssl_atom_type_accuracy": round(ssl["eval_atom_type_acc"], 4),
        "ssl_atom_type_majority": round(ssl["eval_atom_type_majority"], 4),
        "ssl_bond_type_accuracy": round(ssl["eval_bond_type_acc"], 4),
        "ssl_bond_type_majority": round(ssl["eval_bond_type_majority"], 4),
        "ssl_link_accuracy": round(ssl["eval_link_acc"], 4),
        "ssl_count_mae": round(ssl["eval_count_mae"], 3),
        "ssl_heldout_molecules": ssl["heldout_molecules"], "ssl_steps": ssl["steps"], "ssl_stage_s": ssl["elapsed_s"],
        "chebi20_full_splits": full,
    }


# name -> (function, full kwargs, quick kwargs); main() runs them in order and merges their dicts.
MEASUREMENTS = {
    "speed": (speed_ratio_vs_pyg_gin, {"n_batches": 8, "rounds": 3}, {"n_batches": 2, "rounds": 1}),
    "trained": (trained_metrics, {}, {"ssl_steps": 10, "contrastive_steps": 10, "batch_size": 32}),
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
