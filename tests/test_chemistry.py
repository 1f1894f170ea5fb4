"""Standardisation and the hierarchical graph on hand-checked molecules (real RDKit)."""
import numpy as np
import pytest
import selfies
from rdkit import Chem

from graph import chem
from graph.chem import Limits, Reject, Standardizer, canonical_order
from graph.dataset import ATOM, GRAPH, MOTIF, to_pyg
from graph.features import ATOM_FEATURES, BOND_FEATURES
from graph.hierarchy import mol_to_graph

STD = Standardizer()


def parent(smiles: str) -> str:
    return canonical_order(STD.parent(smiles))[1]


@pytest.mark.parametrize("given, expected", [
    ("CC(=O)Oc1ccccc1C(=O)[O-].[Na+]", "CC(=O)Oc1ccccc1C(=O)O"),  # sodium salt -> neutral aspirin
    ("CN1CCC[C@H]1c1cccnc1.Cl", "CN1CCC[C@H]1c1cccnc1"),  # nicotine hydrochloride, stereo kept
    ("[NH3+]CC(=O)[O-]", "NCC(=O)O"),  # zwitterion neutralised
    ("CCCC[NH3+].[Cl-]", "CCCCN"),
    ("[Na+].[Na+].O=C([O-])c1ccccc1C(=O)[O-]", "O=C(O)c1ccccc1C(=O)O"),
    ("C/C=C/C(=O)O", "C/C=C/C(=O)O"),  # E double bond kept
    ("OC(=O)c1ccccc1.c1ccccc1C(=O)OC.O", "COC(=O)c1ccccc1"),  # largest fragment wins
])
def test_parent_standardisation(given, expected):
    assert parent(given) == expected


@pytest.mark.parametrize("smiles, reason", [
    ("", chem.EMPTY), ("   ", chem.EMPTY),
    ("C1CC(", chem.UNPARSEABLE), ("not a molecule", chem.UNPARSEABLE),
    ("CC(C)(C)(C)(C)C", chem.SANITIZATION),  # five-valent carbon
    ("Cc1cccc1", chem.SANITIZATION),  # five aromatic carbons cannot be kekulised
    ("CCO", chem.TOO_SMALL), ("[Na+].[Cl-]", chem.TOO_SMALL), ("CCCC.[K+]", chem.TOO_SMALL),
])
def test_rejects_with_reason(smiles, reason):
    with pytest.raises(Reject) as e:
        STD.parent(smiles)
    assert e.value.reason == reason


def test_size_limits_are_configurable():
    assert parent("CCCCC") == "CCCCC"  # exactly five heavy atoms is kept
    assert canonical_order(Standardizer(Limits(min_heavy_atoms=1)).parent("CO"))[1] == "CO"
    with pytest.raises(Reject) as e:
        Standardizer(Limits(max_heavy_atoms=10)).parent("CCCCCCCCCCCC")
    assert e.value.reason == chem.TOO_LARGE


def test_stereo_is_kept_in_features():
    chir = ATOM_FEATURES.index("chirality")
    tags = {}
    for name, smi in (("L", "C[C@@H](C(=O)O)N"), ("D", "C[C@H](C(=O)O)N")):
        mol, smiles = canonical_order(STD.parent(smi))
        tags[name] = mol_to_graph(mol).atom_x[:, chir]
        assert (tags[name] != 0).sum() == 1  # exactly the alpha carbon carries a tag
    assert smiles == "C[C@@H](N)C(=O)O"
    assert (tags["L"] != tags["D"]).sum() == 1  # enantiomers: same graph, opposite tag
    mol, _ = canonical_order(STD.parent("C/C=C/C(=O)O"))
    g = mol_to_graph(mol)
    stereo = g.bond_x[:, BOND_FEATURES.index("bond_stereo")]
    assert (stereo == 2).sum() == 1  # one E double bond (index 2 = STEREOE)


@pytest.mark.parametrize("smiles, motifs", [
    # acetyl | ester O | benzene | carboxylic acid: the three BRICS bonds of aspirin
    ("CC(=O)Oc1ccccc1C(=O)O", [["C", "C", "O"], ["O"], ["c"] * 6, ["C", "O", "O"]]),
    ("CC(=O)Nc1ccc(O)cc1", [["C", "C", "O"], ["N"], ["c"] * 6 + ["O"]]),  # paracetamol
    ("CCCCc1ccccc1", [["C"] * 4, ["c"] * 6]),  # butylbenzene: one alkyl-aryl cut
    ("c1ccc2ccccc2c1", [["c"] * 10]),  # naphthalene: no BRICS bond, one motif
    ("CCCCC", [["C"] * 5]),
])
def test_brics_motifs(smiles, motifs):
    mol, _ = canonical_order(STD.parent(smiles))
    g = mol_to_graph(mol)
    assert g.num_motifs == len(motifs)
    symbols = [a.GetSymbol().lower() if a.GetIsAromatic() else a.GetSymbol() for a in mol.GetAtoms()]
    got = sorted(sorted(symbols[i] for i in np.flatnonzero(g.atom_motif == k)) for k in range(g.num_motifs))
    assert got == sorted(sorted(m) for m in motifs)
    # every motif is a connected piece: its atoms are linked by non-cut bonds only
    for k in range(g.num_motifs):
        atoms = set(np.flatnonzero(g.atom_motif == k).tolist())
        if len(atoms) > 1:
            frag = Chem.MolFragmentToSmiles(mol, atomsToUse=sorted(atoms))
            assert "." not in frag


def test_graph_features_and_canonical_order():
    mol, smiles = canonical_order(STD.parent("OC(=O)c1ccccc1O"))  # salicylic acid
    g = mol_to_graph(mol)
    assert g.atom_x.shape == (10, len(ATOM_FEATURES)) and g.bonds.shape == (10, 2)
    # atom i is the i-th atom written in the canonical SMILES
    written = [a.GetSymbol() for a in Chem.MolFromSmiles(smiles).GetAtoms()]
    assert [a.GetSymbol() for a in mol.GetAtoms()] == written
    z = g.atom_x[:, ATOM_FEATURES.index("atomic_num")] + 1
    assert z.tolist() == [Chem.GetPeriodicTable().GetAtomicNumber(s) for s in written]
    arom = g.atom_x[:, ATOM_FEATURES.index("is_aromatic")]
    ring = g.atom_x[:, ATOM_FEATURES.index("is_in_ring")]
    assert arom.sum() == 6 and ring.sum() == 6
    hs = g.atom_x[:, ATOM_FEATURES.index("num_hs")]
    assert hs.sum() == 6  # C7H6O3


def test_hierarchical_pyg_graph():
    mol, _ = canonical_order(STD.parent("CC(=O)Oc1ccccc1C(=O)O"))
    g = mol_to_graph(mol)
    d = to_pyg(g)
    n, m, b = 13, 4, 13
    assert d.num_nodes == n + m + 1
    assert (d.node_type == ATOM).sum() == n and (d.node_type == MOTIF).sum() == m and (d.node_type == GRAPH).sum() == 1
    assert d.edge_index.shape[1] == 2 * b + 2 * n + 2 * m
    src, dst = d.edge_index
    # every atom links to exactly its motif node, both ways; every motif to the graph node
    a2m = (d.edge_type == 1)
    assert sorted(zip(src[a2m].tolist(), dst[a2m].tolist())) == [(i, n + int(g.atom_motif[i])) for i in range(n)]
    m2g = d.edge_type == 3
    assert dst[m2g].tolist() == [n + m] * m
    # edge set is symmetric
    pairs = set(zip(src.tolist(), dst.tolist()))
    assert all((v, u) in pairs for u, v in pairs)


def test_selfies_round_trip():
    mol, smiles = canonical_order(STD.parent("CN1CCC[C@H]1c1cccnc1"))
    sf = chem.to_selfies(smiles)
    assert Chem.CanonSmiles(selfies.decoder(sf)) == smiles


def test_reaction_components_kept_and_maps_stripped():
    std = Standardizer()
    mols = std.components("[CH3:1][C:2](=[O:3])[OH:4].[Na+].[OH-]")
    smiles = [Chem.MolToSmiles(m) for m in mols]
    assert smiles == ["CC(=O)O", "[Na+]", "[OH-]"]  # nothing stripped or neutralised, no maps left
    assert std.components("") == []


@pytest.mark.parametrize("smiles", [
    "N[C@@H](Cc1ccccc1)C(=O)O[C@H](C)CC",  # two stereocentres
    "C[C@H]1CC[C@@H](O)[C@H](C(C)C)C1",  # menthol: three, in a ring
    "C/C=C/[C@H](Cl)CC/C=C\\C",  # E and Z double bonds and a centre
])
def test_stored_graph_does_not_depend_on_input_atom_order(smiles):
    """Random SMILES of one molecule give the same stored graph, stereo features included
    (RDKit's raw CW/CCW tag depends on the written bond order; ours must not)."""
    ref = None
    mol0 = Chem.MolFromSmiles(smiles)
    for k in range(25):
        mol, canon = canonical_order(STD.parent(Chem.MolToSmiles(mol0, doRandom=True)))
        g = mol_to_graph(mol)
        bonds = sorted(map(tuple, np.c_[np.sort(g.bonds, 1), g.bond_x].tolist()))
        key = (canon, g.atom_x.tobytes(), bonds, g.atom_motif.tolist())
        assert ref is None or key == ref
        ref = key
    mirror = Chem.MolFromSmiles(smiles.replace("@@", "!").replace("@", "@@").replace("!", "@"))
    g_mirror = mol_to_graph(canonical_order(STD.parent(Chem.MolToSmiles(mirror)))[0])
    if "@" in smiles:  # the enantiomer differs exactly in its chirality column
        chir = ATOM_FEATURES.index("chirality")
        diff = np.flatnonzero((g_mirror.atom_x != np.frombuffer(ref[1], np.uint8).reshape(-1, 9)).any(1))
        assert len(diff) > 0 and (g_mirror.atom_x[diff][:, [c for c in range(9) if c != chir]]
                                  == np.frombuffer(ref[1], np.uint8).reshape(-1, 9)[diff][:, [c for c in range(9) if c != chir]]).all()


def test_stored_smiles_is_a_fixed_point_for_ring_stereo():
    """A trans-1,4-cyclohexane read from atom-mapped USPTO text: RDKit's first canonical SMILES differs
    from the one its own re-parse gives; the stored SMILES must be the stable one (what evaluation sees)."""
    from graph.records import encode

    mapped = "[OH:1][C@H:2]1[CH2:3][CH2:4][C@H:5]([N:6]2[CH2:7][CH2:8][CH2:9][CH2:10][C:11]2=[O:12])[CH2:13][CH2:14]1"
    (mol,) = STD.components(mapped)
    enc = encode(mol)
    assert Chem.MolToSmiles(Chem.MolFromSmiles(enc.smiles)) == enc.smiles
    assert Chem.CanonSmiles(selfies.decoder(enc.selfies)) == enc.smiles
