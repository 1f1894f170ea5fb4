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


def canonical_chirality(atom: Chem.Atom, tag: int, rank: list[int]) -> int:
    """CW/CCW re-expressed for neighbours in ascending canonical rank.

    RDKit's tag is relative to the order the atom's bonds were written in, so the same stereocentre
    gets CW from one SMILES and CCW from another. Relative to the neighbours' canonical ranks the
    tag depends only on the molecule.
    """
    if tag not in (1, 2):  # CHI_TETRAHEDRAL_CW / CCW; others carry no handedness to fix
        return tag
    i = atom.GetIdx()
    nbrs = [rank[b.GetOtherAtomIdx(i)] for b in atom.GetBonds()]
    odd = sum(a > b for k, a in enumerate(nbrs) for b in nbrs[k + 1:]) % 2
    return 3 - tag if odd else tag


def atom_features(mol: Chem.Mol, order: list[int], rank: list[int], out: list) -> None:
    """Append len(ATOM_FEATURES) indices per atom to `out` (flat), atoms taken in `order`."""
    ring_atoms = {i for ring in mol.GetRingInfo().AtomRings() for i in ring}
    rows = []
    for atom in mol.GetAtoms():
        z = atom.GetAtomicNum()
        chiral = int(atom.GetChiralTag())
        if chiral:
            chiral = canonical_chirality(atom, chiral, rank)
        degree = atom.GetTotalDegree()
        charge = atom.GetFormalCharge()
        hs = atom.GetTotalNumHs()
        radicals = atom.GetNumRadicalElectrons()
        rows.append((
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
    for i in order:
        out.extend(rows[i])


def bond_features(mol: Chem.Mol, rank: list[int], index_out: list, feat_out: list) -> None:
    """Append (begin, end) per bond (new atom indices `rank`, begin < end, bonds sorted) to `index_out`
    and len(BOND_FEATURES) indices per bond to `feat_out`.

    Each bond is stored once; both directions are made when the graph is built for the encoder.
    """
    double = BT.DOUBLE
    rows = []
    for bond in mol.GetBonds():
        a, b = rank[bond.GetBeginAtomIdx()], rank[bond.GetEndAtomIdx()]
        btype = bond.GetBondType()
        rows.append((
            a if a < b else b, b if a < b else a,
            _BOND_TYPE.get(btype, 4),
            _STEREO.get(bond.GetStereo(), 6) if btype == double else 0,  # only double bonds carry stereo
            int(bond.GetIsConjugated()),
        ))
    rows.sort()
    for a, b, t, st, c in rows:
        index_out.extend((a, b))
        feat_out.extend((t, st, c))
