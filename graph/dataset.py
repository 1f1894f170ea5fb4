"""Reading preprocessed shards lazily: Arrow IPC files memory-mapped, one molecule built per access.

Parquet is compact but not randomly accessible, so each shard is converted once into an uncompressed
Arrow IPC file (`_arrow/` beside the shards, written atomically) and memory-mapped: an item reads its
slices straight from the page cache, the data set is never loaded whole, and DataLoader workers share
the pages.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch_geometric.data import Data

from .atomic import atomic_writer
from .features import ATOM_FEATURES, BOND_FEATURES
from .hierarchy import MolGraph

# Node kinds and edge types of the hierarchical graph (the encoder's view).
ATOM, MOTIF, GRAPH = 0, 1, 2
BOND, ATOM_TO_MOTIF, MOTIF_TO_ATOM, MOTIF_TO_GRAPH, GRAPH_TO_MOTIF = 0, 1, 2, 3, 4
NUM_EDGE_TYPES = 5

def to_pyg(g: MolGraph) -> Data:
    """The encoder's view: atom nodes, then motif nodes, then the graph node, with typed edges.

    Fields: `x` [N, 9] atom features (zeros on motif/graph nodes, whose kind is in `node_type`),
    `edge_index` [2, E], `edge_attr` [E, 3] bond features (zeros on hierarchy edges), `edge_type` [E],
    `num_atoms`, `num_motifs` (shape [1], so batches concatenate them). Built in numpy, one tensor each.
    """
    n, m, nb = g.num_atoms, g.num_motifs, len(g.bonds)
    atoms = np.arange(n)
    motif_of = g.atom_motif.astype(np.int64) + n
    motifs = np.arange(n, n + m)
    graph_node = np.full(m, n + m)
    src = np.concatenate([g.bonds[:, 0], g.bonds[:, 1], atoms, motif_of, motifs, graph_node])
    dst = np.concatenate([g.bonds[:, 1], g.bonds[:, 0], motif_of, atoms, graph_node, motifs])
    edge_type = np.repeat([BOND, ATOM_TO_MOTIF, MOTIF_TO_ATOM, MOTIF_TO_GRAPH, GRAPH_TO_MOTIF], [2 * nb, n, n, m, m])
    edge_attr = np.zeros((len(edge_type), len(BOND_FEATURES)), dtype=np.int64)
    edge_attr[: 2 * nb] = np.concatenate([g.bond_x, g.bond_x])
    x = np.zeros((n + m + 1, len(ATOM_FEATURES)), dtype=np.int64)
    x[:n] = g.atom_x
    node_type = np.repeat([ATOM, MOTIF, GRAPH], [n, m, 1])
    return Data(
        x=torch.from_numpy(x), node_type=torch.from_numpy(node_type),
        edge_index=torch.from_numpy(np.stack([src, dst]).astype(np.int64)),
        edge_attr=torch.from_numpy(edge_attr), edge_type=torch.from_numpy(edge_type),
        num_atoms=torch.tensor([n]), num_motifs=torch.tensor([m]),
    )


def to_pyg_atoms_only(g: MolGraph) -> Data:
    """The plain molecular graph (atoms and bonds, both directions): the baseline encoders read this."""
    src = np.concatenate([g.bonds[:, 0], g.bonds[:, 1]])
    dst = np.concatenate([g.bonds[:, 1], g.bonds[:, 0]])
    return Data(
        x=torch.from_numpy(g.atom_x.astype(np.int64)),
        edge_index=torch.from_numpy(np.stack([src, dst]).astype(np.int64)),
        edge_attr=torch.from_numpy(np.concatenate([g.bond_x, g.bond_x]).astype(np.int64)),
    )


class _Shard:
    """One memory-mapped shard: numpy views (zero-copy) of the list columns' offsets and values."""

    def __init__(self, path: str):
        self.table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
        self.lists = {}
        for name in self.table.column_names:
            col = self.table.column(name)
            if pa.types.is_list(col.type):
                arr = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
                self.lists[name] = (arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False))

    def values(self, name: str, i: int) -> np.ndarray:
        offsets, values = self.lists[name]
        return values[offsets[i]:offsets[i + 1]]


class ShardDataset(torch.utils.data.Dataset):
    """The accepted rows of a `graph.preprocess` output folder, in input order.

    `dataset[i]` is the hierarchical PyG graph of row i's molecule (first block, first molecule), with
    `row` set; `graphs(i, prefix)` gives every molecule of a block (reaction sides, instruction inputs);
    `record(i)` gives the row's scalar columns (ids, text, SMILES, SELFIES).
    """

    def __init__(self, folder: str, prefix: str = "", hierarchical: bool = True, cache_dir: str | None = None):
        with open(os.path.join(folder, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.folder, self.prefix, self.hierarchical = folder, prefix, hierarchical
        self.cache_dir = cache_dir or os.path.join(folder, "_arrow")
        self.shard_files = [s["file"] for s in self.manifest["shards"] if s["rows"] > 0]
        sizes = [s["rows"] for s in self.manifest["shards"] if s["rows"] > 0]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._open: dict[int, _Shard] = {}
        if self.shard_files:
            names = pq.read_schema(os.path.join(folder, self.shard_files[0])).names
            if prefix + "atom_x" not in names:
                blocks = sorted(n[: -len("atom_x")] for n in names if n.endswith("atom_x"))
                raise ValueError(f"{folder} has no molecule block {prefix!r}; its blocks are {blocks} "
                                 "(e.g. ShardDataset(folder, prefix='products_'), or 'FOLDER:products_' in a recipe)")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _column(self, name: str) -> list:
        """One column over all shards, read from the Parquet files (no graph is built)."""
        return [pq.read_table(os.path.join(self.folder, f), columns=[name]).column(name) for f in self.shard_files]

    def item_rows(self) -> np.ndarray:
        """The input row id of every item, e.g. to split train / held-out by row."""
        cols = self._column("row")
        return np.concatenate([c.to_numpy() for c in cols]) if cols else np.zeros(0, np.int64)

    def _locate(self, i: int) -> tuple[_Shard, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        if k not in self._open:
            self._open[k] = _Shard(self._arrow_path(k))
        return self._open[k], i - int(self.starts[k])

    def _arrow_path(self, k: int) -> str:
        name = self.shard_files[k].replace(".parquet", ".arrow")
        path = os.path.join(self.cache_dir, name)
        if not os.path.exists(path):  # first access: convert this shard only
            table = pq.read_table(os.path.join(self.folder, self.shard_files[k])).combine_chunks()
            with atomic_writer(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
                w.write_table(table)
        return path

    def graphs(self, i: int, prefix: str | None = None) -> list[MolGraph]:
        """Every molecule of row i's block `prefix` (default: the dataset's), in stored order."""
        shard, j = self._locate(i)
        p = self.prefix if prefix is None else prefix
        na, nb, nm = (shard.values(p + c, j) for c in ("mol_num_atoms", "mol_num_bonds", "mol_num_motifs"))
        atom_x = shard.values(p + "atom_x", j).reshape(-1, len(ATOM_FEATURES))
        bonds = shard.values(p + "bonds", j).reshape(-1, 2)
        bond_x = shard.values(p + "bond_x", j).reshape(-1, len(BOND_FEATURES))
        motif = shard.values(p + "atom_motif", j)
        out, a0, b0 = [], 0, 0
        for a, b, m in zip(na.tolist(), nb.tolist(), nm.tolist()):
            out.append(MolGraph(atom_x[a0:a0 + a], bonds[b0:b0 + b], bond_x[b0:b0 + b], motif[a0:a0 + a], m))
            a0, b0 = a0 + a, b0 + b
        return out

    def record(self, i: int) -> dict:
        """Row i's scalar columns (everything but the flat graph arrays)."""
        shard, j = self._locate(i)
        t = shard.table
        return {n: t.column(n)[j].as_py() for n in t.column_names if n not in shard.lists}

    def __getitem__(self, i: int) -> Data:
        return self._item(i, 0)

    def _item(self, i: int, k: int) -> Data:
        """Molecule k of row i's block as a PyG graph, with the input row id."""
        g = self.graphs(i)[k]
        data = to_pyg(g) if self.hierarchical else to_pyg_atoms_only(g)
        shard, j = self._locate(i)
        data.row = torch.tensor([shard.table.column("row")[j].as_py()])
        return data


class MoleculeDataset(ShardDataset):
    """Every molecule of block `prefix` as its own item: reaction sides and multi-molecule inputs give
    all their molecules (ShardDataset gives one item per row, its first molecule)."""

    def __init__(self, folder: str, prefix: str = "", hierarchical: bool = True, cache_dir: str | None = None):
        super().__init__(folder, prefix, hierarchical, cache_dir)
        cols = self._column(prefix + "mol_num_atoms")
        counts = np.concatenate([c.combine_chunks().value_lengths().to_numpy() for c in cols]) if cols else np.zeros(0, np.int64)
        self.mol_row = np.repeat(np.arange(len(counts)), counts)  # dataset row of each molecule
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        self.mol_k = np.arange(len(self.mol_row)) - starts  # its position within the row's block

    def __len__(self) -> int:
        return len(self.mol_row)

    def item_rows(self) -> np.ndarray:
        return super().item_rows()[self.mol_row]

    def __getitem__(self, i: int) -> Data:
        return self._item(int(self.mol_row[i]), int(self.mol_k[i]))
