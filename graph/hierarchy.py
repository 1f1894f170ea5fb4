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

def append_motifs(mol: Chem.Mol, bonds: list, out: list) -> int:
    """Append each atom's BRICS motif id to `out`; return the number of motifs.

    Motifs are the connected pieces left after cutting every bond `FindBRICSBonds` reports (a molecule
    with no BRICS bond is one motif). `bonds` holds the molecule's (begin, end) pairs, flat.
    Motif ids are numbered by their lowest atom index, so they are deterministic.
    """
    n = mol.GetNumAtoms()
    cut = {(a, b) if a < b else (b, a) for (a, b), _ in BRICS.FindBRICSBonds(mol)}
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    it = iter(bonds)
    for a, b in zip(it, it):
        if (a, b) not in cut and (b, a) not in cut:
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


def graph_lists(mol: Chem.Mol) -> tuple[list, list, list, list, int]:
    """Flat lists (atom features, bond pairs, bond features, atom motif ids) and the motif count.

    The hot path of preprocessing: plain lists, so a chunk of molecules becomes Arrow arrays at once.
    """
    atom_x, bonds, bond_x, motif = [], [], [], []
    atom_features(mol, atom_x)
    bond_features(mol, bonds, bond_x)
    m = append_motifs(mol, bonds, motif)
    return atom_x, bonds, bond_x, motif, m


def mol_to_graph(mol: Chem.Mol) -> MolGraph:
    """Pure function: an RDKit molecule to its hierarchical graph (same code path as the shards)."""
    atom_x, bonds, bond_x, motif, m = graph_lists(mol)
    return MolGraph(
        atom_x=np.asarray(atom_x, dtype=np.uint8).reshape(-1, len(ATOM_FEATURES)),
        bonds=np.asarray(bonds, dtype=np.int32).reshape(-1, 2),
        bond_x=np.asarray(bond_x, dtype=np.uint8).reshape(-1, len(BOND_FEATURES)),
        atom_motif=np.asarray(motif, dtype=np.int32),
        num_motifs=m,
    )
