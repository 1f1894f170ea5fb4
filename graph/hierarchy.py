"""The hierarchical molecular graph: atoms, BRICS motifs, one graph node (M3LLM, DESIGN.md).

Stored form (what shards hold, per molecule): atom features [n, 9], bonds once as (begin, end) [B, 2],
bond features [B, 3], the motif of each atom [n]. The encoder form (`graph.dataset.to_pyg`) adds the
motif and graph nodes and the typed atom-motif / motif-graph edges, all edges in both directions.
No torch here: preprocessing workers stay light.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rdkit import Chem
from rdkit.Chem import BRICS

from .features import ATOM_FEATURES, BOND_FEATURES, atom_features, bond_features

def append_motifs(mol: Chem.Mol, rank: list[int], bonds: list, out: list) -> int:
    """Append each atom's BRICS motif id to `out`; return the number of motifs.

    Motifs are the connected pieces left after cutting every bond `FindBRICSBonds` reports (a molecule
    with no BRICS bond is one motif). `bonds` holds the (begin, end) pairs, flat, in new atom indices
    (`rank` maps mol's atom indices to them). Motif ids are numbered by their lowest new atom index.
    """
    n = mol.GetNumAtoms()
    cut = set()
    for (a, b), _ in BRICS.FindBRICSBonds(mol):
        a, b = rank[a], rank[b]
        cut.add((a, b) if a < b else (b, a))
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    it = iter(bonds)
    for a, b in zip(it, it):  # begin < end
        if (a, b) not in cut:
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)  # the root is the component's lowest atom
    ids: dict[int, int] = {}
    for i in range(n):
        r = root(i)
        if r not in ids:
            ids[r] = len(ids)
        out.append(ids[r])
    return len(ids)


@dataclass
class MolGraph:
    """One molecule's hierarchical graph in stored form (numpy arrays)."""

    atom_x: np.ndarray  # [n, len(ATOM_FEATURES)] uint8
    bonds: np.ndarray  # [B, 2] int32, each bond once
    bond_x: np.ndarray  # [B, len(BOND_FEATURES)] uint8
    atom_motif: np.ndarray  # [n] int32
    num_motifs: int

    @property
    def num_atoms(self) -> int:
        return len(self.atom_x)


def smiles_order(mol: Chem.Mol) -> tuple[str, list[int]]:
    """Canonical SMILES and the order its atoms are written in (order[k] = atom index of the k-th)."""
    smiles = Chem.MolToSmiles(mol)
    return smiles, [int(i) for i in mol.GetProp("_smilesAtomOutputOrder").strip("[]").split(",") if i]


def graph_lists(mol: Chem.Mol) -> tuple[str, list, list, list, list, int]:
    """Canonical SMILES, then flat lists (atom features, bond pairs, bond features, atom motif ids)
    and the motif count, atoms in canonical SMILES order and bonds sorted.

    Atom i is the i-th atom written in the canonical SMILES, so node order follows the text the LLM
    reads and does not depend on how the input was written. The hot path of preprocessing: the molecule
    is not renumbered, features are permuted; plain lists, so a chunk becomes Arrow arrays at once.
    """
    smiles, order = smiles_order(mol)
    rank = [0] * len(order)
    for k, i in enumerate(order):
        rank[i] = k
    atom_x, bonds, bond_x, motif = [], [], [], []
    atom_features(mol, order, rank, atom_x)
    bond_features(mol, rank, bonds, bond_x)
    m = append_motifs(mol, rank, bonds, motif)
    return smiles, atom_x, bonds, bond_x, motif, m


def mol_to_graph(mol: Chem.Mol) -> MolGraph:
    """Pure function: an RDKit molecule to its hierarchical graph (same code path as the shards).

    Atoms are in canonical SMILES order (as `graph.chem.canonical_order` numbers them)."""
    _, atom_x, bonds, bond_x, motif, m = graph_lists(mol)
    return MolGraph(
        atom_x=np.asarray(atom_x, dtype=np.uint8).reshape(-1, len(ATOM_FEATURES)),
        bonds=np.asarray(bonds, dtype=np.int32).reshape(-1, 2),
        bond_x=np.asarray(bond_x, dtype=np.uint8).reshape(-1, len(BOND_FEATURES)),
        atom_motif=np.asarray(motif, dtype=np.int32),
        num_motifs=m,
    )
