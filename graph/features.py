"""OGB-style categorical atom and bond features (the vocabularies the encoder embeds).

Each feature is an index into a fixed list; out-of-list values go to the last ("misc") slot, as OGB
does, so a rare element or charge never crashes featurisation.
"""
from __future__ import annotations

from rdkit import Chem

HT = Chem.rdchem.HybridizationType
BT = Chem.rdchem.BondType
BS = Chem.rdchem.BondStereo

ATOM_FEATURES = (
    "atomic_num",  # 1..118, misc
    "chirality",  # unspecified, CW, CCW, other, misc
    "degree",  # 0..10, misc (total degree, implicit Hs included)
    "formal_charge",  # -5..5, misc
    "num_hs",  # 0..8, misc
    "num_radical_electrons",  # 0..4, misc
    "hybridization",  # SP, SP2, SP3, SP3D, SP3D2, misc
    "is_aromatic",
    "is_in_ring",
)
# Vocabulary size of each atom feature (index range), in ATOM_FEATURES order.
ATOM_VOCAB = (119, 5, 12, 12, 10, 6, 6, 2, 2)

BOND_FEATURES = ("bond_type", "bond_stereo", "is_conjugated")
BOND_VOCAB = (5, 7, 2)  # single, double, triple, aromatic, misc | none, Z, E, cis, trans, any, misc

_HYBRID = {HT.SP: 0, HT.SP2: 1, HT.SP3: 2, HT.SP3D: 3, HT.SP3D2: 4}
_BOND_TYPE = {BT.SINGLE: 0, BT.DOUBLE: 1, BT.TRIPLE: 2, BT.AROMATIC: 3}
_STEREO = {BS.STEREONONE: 0, BS.STEREOZ: 1, BS.STEREOE: 2, BS.STEREOCIS: 3, BS.STEREOTRANS: 4, BS.STEREOANY: 5}


def canonical_chirality(atom: Chem.Atom, tag: int) -> int:
    """CW/CCW re-expressed for neighbours in ascending atom index.

    RDKit's tag is relative to the order the atom's bonds were written in, so the same stereocentre
    gets CW from one SMILES and CCW from another. Relative to sorted neighbour indices (canonical once
    atoms are in canonical order) the tag depends only on the molecule.
    """
    if tag not in (1, 2):  # CHI_TETRAHEDRAL_CW / CCW; others carry no handedness to fix
        return tag
    i = atom.GetIdx()
    nbrs = [b.GetOtherAtomIdx(i) for b in atom.GetBonds()]
    odd = sum(a > b for k, a in enumerate(nbrs) for b in nbrs[k + 1:]) % 2
    return 3 - tag if odd else tag


def atom_features(mol: Chem.Mol, out: list) -> None:
    """Append len(ATOM_FEATURES) indices per atom to `out` (flat, atom-major)."""
    ring_atoms = {i for ring in mol.GetRingInfo().AtomRings() for i in ring}
    append = out.extend
    for atom in mol.GetAtoms():
        z = atom.GetAtomicNum()
        chiral = int(atom.GetChiralTag())
        if chiral:
            chiral = canonical_chirality(atom, chiral)
        degree = atom.GetTotalDegree()
        charge = atom.GetFormalCharge()
        hs = atom.GetTotalNumHs()
        radicals = atom.GetNumRadicalElectrons()
        append((
            z - 1 if 0 < z < 119 else 118,
            chiral if chiral < 4 else 4,
            degree if degree < 11 else 11,
            charge + 5 if -6 < charge < 6 else 11,
            hs if hs < 9 else 9,
            radicals if radicals < 5 else 5,
            _HYBRID.get(atom.GetHybridization(), 5),
            int(atom.GetIsAromatic()),
            int(atom.GetIdx() in ring_atoms),
        ))


def bond_features(mol: Chem.Mol, index_out: list, feat_out: list) -> None:
    """Append (begin, end) per bond to `index_out` and len(BOND_FEATURES) indices to `feat_out`.

    Each bond is stored once; both directions are made when the graph is built for the encoder.
    """
    for bond in mol.GetBonds():
        index_out.extend((bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()))
        feat_out.extend((
            _BOND_TYPE.get(bond.GetBondType(), 4),
            _STEREO.get(bond.GetStereo(), 6),
            int(bond.GetIsConjugated()),
        ))
