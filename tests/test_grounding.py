"""trainer.dataset.grounding: structure questions with RDKit answers, balanced yes/no per group, the held-out split
by InChIKey (duplicates, rewritten SMILES, salts, stereoisomers), determinism, the CLI, and graph.preprocess
reading the records back with the same atom and motif counts."""
import collections
import json
import os

import pytest
import selfies
from rdkit import Chem
from rdkit.Chem import BRICS, Crippen

from conftest import DATA, cli
from graph.chem import Standardizer
from graph.preprocess import read_table
from trainer.dataset import grounding as G

CHEBI_TEST = os.path.join(DATA, "chebi20", "test.txt")
ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"

# Hand-picked molecules and the groups a chemist names in them (every other group: absent).
KNOWN = {
    ASPIRIN: {"carboxylic_acid", "ester", "benzene_ring"},
    "CC(=O)Nc1ccc(O)cc1": {"amide", "phenol", "benzene_ring"},  # paracetamol
    "NCC(=O)O": {"primary_amine", "carboxylic_acid"},  # glycine
    "CCCC(N)=O": {"amide"},  # a primary amide's NH2 is not an amine
    "CCCCNC(=N)N": set(),  # nor is a guanidine's
    "Nc1ccc(S(N)(=O)=O)cc1": {"primary_amine", "sulfonamide", "benzene_ring"},  # sulfanilamide
    "O=Cc1ccco1": {"aldehyde"},  # furfural: aromatic ring O is no ether, furan no benzene
    "O=C1CCCC=C1": {"ketone", "alkene"},
    "O=[N+]([O-])c1ccc(Cl)cc1": {"nitro", "halogen", "benzene_ring"},
    "N#Cc1ccccc1OCC": {"nitrile", "ether", "benzene_ring"},
    "OCC1OC(O)C(O)C(O)C1OP(=O)(O)O": {"alcohol", "ether", "phosphate"},  # a sugar phosphate
    "CCOC(=O)CC(C)=O": {"ester", "ketone"},  # ethyl acetoacetate
}


def aromatic_rings(mol) -> int:
    return sum(all(mol.GetAtomWithIdx(i).GetIsAromatic() for i in ring) for ring in mol.GetRingInfo().AtomRings())


def test_answers_agree_with_rdkit_on_hand_picked_molecules():
    std = Standardizer()
    aspirin = G.molecule(ASPIRIN, std).answers
    assert (aspirin["has_ester"], aspirin["has_carboxylic_acid"], aspirin["has_primary_amine"]) == ("Yes", "Yes", "No")
    assert (aspirin["count_rings"], aspirin["count_aromatic_rings"], aspirin["count_heavy_atoms"]) == ("1", "1", "13")
    # the salt is standardised to the same parent: same key, same answers
    salt = G.molecule("CC(=O)Oc1ccccc1C(=O)[O-].[Na+]", std)
    assert salt.inchikey == G.molecule(ASPIRIN, std).inchikey and salt.answers == aspirin
    for smiles, groups in KNOWN.items():
        m = G.molecule(smiles, std)
        mol = Chem.MolFromSmiles(smiles)
        yes = {qt[4:] for qt in G.YESNO_TYPES if m.answers[qt] == "Yes"}
        assert yes == groups, smiles
        assert set(m.answers) == set(G.QUESTION_TYPES)
        assert m.answers["count_rings"] == str(len(Chem.GetSymmSSSR(mol)))
        assert m.answers["count_aromatic_rings"] == str(aromatic_rings(mol))
        assert m.answers["count_heavy_atoms"] == str(mol.GetNumHeavyAtoms())
        # motifs: the pieces left after cutting the BRICS bonds, re-derived here independently
        pieces = Chem.GetMolFrags(BRICS.BreakBRICSBonds(mol)) if BRICS.FindBRICSBonds(mol) else [()]
        assert m.answers["count_brics_motifs"] == str(len(pieces)), smiles
        assert m.answers["property_logp"] == f"{Crippen.MolLogP(mol):.2f}"
    assert G.molecule("C1CCC2CC3CCCCC3CC2C1", std).answers["count_rings"] == "3"
    assert G.logp_text(-0.004) == "0.00" and G.logp_text(-0.5) == "-0.50" and G.logp_text(2.345) in ("2.35", "2.34")


def test_phrasings_name_the_group_and_are_stable():
    for qt in G.QUESTION_TYPES:
        texts = {G.instruction(qt, f"KEY{i}") for i in range(40)}
        assert len(texts) > 1 and G.instruction(qt, "KEY1") == G.instruction(qt, "KEY1")
        if qt in G.YESNO_TYPES:
            name = dict((g[0], g[1]) for g in G.GROUPS)[qt[4:]]
            assert all(name in t and "yes or no" in t for t in texts)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def chebi(tmp_path_factory):
    d = tmp_path_factory.mktemp("chebi")
    summary = G.build([CHEBI_TEST], str(d / "g.jsonl"), questions_per_molecule=3, min_positives=8)
    return summary, read(d / "g.jsonl"), read(d / "g_test.jsonl"), d


def test_chebi_records_balance_and_split(chebi):
    summary, train, test, d = chebi
    assert summary["input_rows"] == summary["molecules"] + summary["duplicates"] + summary["rejected"] == 200
    rejects = read(d / "g.rejects.jsonl")
    assert summary["rejected_by_reason"] == dict(collections.Counter(r["reason"] for r in rejects))
    assert summary["records"] == {"train": len(train), "test": len(test)}
    keys = {s: {r["metadata"]["inchikey"] for r in rows} for s, rows in (("train", train), ("test", test))}
    assert keys["train"] and keys["test"] and not keys["train"] & keys["test"]
    assert {s: len(k) for s, k in keys.items()} == summary["molecules_by_split"]
    assert 0.1 < len(keys["test"]) / summary["molecules"] < 0.3  # the hash gives about the asked 0.2
    for split, rows in (("train", train), ("test", test)):
        kinds = collections.Counter((r["metadata"]["question_type"], r["output"]) for r in rows)
        for qt in G.YESNO_TYPES:
            assert kinds[qt, "Yes"] == kinds[qt, "No"], (split, qt)  # balanced per group
        asked = {qt for qt, _ in kinds}
        assert asked == {qt for qt, v in summary["by_question_type"].items() if v[split]}
        load = collections.Counter(r["metadata"]["inchikey"] for r in rows if r["metadata"]["answer_kind"] == "yesno")
        assert max(load.values()) <= 3
        per_mol = collections.Counter((r["metadata"]["inchikey"], r["metadata"]["question_type"]) for r in rows)
        assert max(per_mol.values()) == 1  # one question of a type per molecule
        for r in rows:
            m = r["metadata"]
            assert m["split"] == split == G.split_of(m["inchikey"], 0.2) and m["task"] == "grounding"
            assert Chem.CanonSmiles(selfies.decoder(r["input"])) == m["smiles"]
            mol = Chem.MolFromSmiles(m["smiles"])
            assert Chem.MolToInchiKey(mol) == m["inchikey"]
            assert m["answer_kind"] == G.answer_kind(m["question_type"])
            if m["question_type"] == "count_heavy_atoms":
                assert r["output"] == str(mol.GetNumHeavyAtoms())
            elif m["question_type"] == "count_rings":
                assert r["output"] == str(mol.GetRingInfo().NumRings())
            elif m["answer_kind"] == "yesno":
                pattern = Chem.MolFromSmarts(dict((g[0], g[2]) for g in G.GROUPS)[m["question_type"][4:]])
                assert r["output"] == ("Yes" if mol.HasSubstructMatch(pattern) else "No")
            elif m["answer_kind"] == "number":
                assert abs(float(r["output"]) - Crippen.MolLogP(mol)) <= 0.005 + 1e-9
    # rare groups: skipped, reported with their positives, never asked
    for g, n in summary["skipped_groups"].items():
        assert n < 8 and f"has_{g}" not in summary["by_question_type"]
    assert summary["skipped_groups"] == {g: round(p * summary["molecules"]) for g, p in summary["prevalence"].items()
                                         if round(p * summary["molecules"]) < 8}


def test_reruns_same_bytes_seed_changes_sampling_not_split(chebi, tmp_path):
    summary, train, test, d = chebi
    again = G.build([CHEBI_TEST], str(tmp_path / "a.jsonl"), questions_per_molecule=3, min_positives=8)
    assert (tmp_path / "a.jsonl").read_bytes() == (d / "g.jsonl").read_bytes()
    assert (tmp_path / "a_test.jsonl").read_bytes() == (d / "g_test.jsonl").read_bytes()
    assert {k: v for k, v in again.items() if k not in ("output", "held_out", "rejects")} == \
        {k: v for k, v in summary.items() if k not in ("output", "held_out", "rejects")}
    other = G.build([CHEBI_TEST], str(tmp_path / "s.jsonl"), questions_per_molecule=3, min_positives=8, seed=1)
    assert other["molecules_by_split"] == summary["molecules_by_split"]
    picked = {(r["metadata"]["inchikey"], r["metadata"]["question_type"]) for r in train}
    picked1 = {(r["metadata"]["inchikey"], r["metadata"]["question_type"]) for r in read(tmp_path / "s.jsonl")}
    assert picked != picked1  # another seed asks other molecules ...
    assert {r["metadata"]["inchikey"] for r in train} == {k for k, _ in picked1}  # ... from the same side


def test_duplicates_rewritten_smiles_and_stereoisomers_stay_on_one_side(tmp_path):
    base = [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in KNOWN] + [
        "CCCCCCCCO", "c1ccc2ccccc2c1", "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "CN1C=NC2=C1C(=O)N(C)C(=O)N2C",
        "CCN(CC)CCOC(=O)c1ccc(N)cc1", "OC(=O)CCCCCCCCC=C", "Clc1ccc(Cl)cc1", "CC(=O)CCCCC", "NCCCCCN",
        "C1CCOC1CCO", "OCC(O)CO", "CCCCCCCCC(=O)O", "Oc1ccc(O)cc1", "CC(C)(C)OC(=O)NCC", "O=C(O)c1ccccc1N",
    ]
    aspirin_forms = ["OC(=O)c1ccccc1OC(C)=O", "c1ccc(C(O)=O)c(OC(=O)C)c1", "CC(=O)Oc1ccccc1C(=O)[O-].[Na+]"]
    alanines = ["C[C@H](N)C(=O)OCC", "C[C@@H](N)C(=O)OCC"]  # enantiomers: two InChIKeys, one skeleton
    bad = ["c1cccc1", "not_smiles", "CC"]  # cannot be kekulised, syntax, too small
    a = tmp_path / "a.smi"
    a.write_text("smiles name\n" + "".join(f"{s} m{i}\n" for i, s in enumerate(base + aspirin_forms + alanines + bad)))
    b = tmp_path / "b.csv"  # the same molecules written otherwise, in another layout, reversed
    b.write_text("id,SMILES\n" + "".join(f"x{i},{Chem.MolToSmiles(Chem.MolFromSmiles(s), doRandom=True)}\n"
                                         for i, s in enumerate(reversed(base))))
    s = G.build([str(a), str(b)], str(tmp_path / "g.jsonl"), held_out_fraction=0.5, min_positives=2)
    n_a = len(base) + len(aspirin_forms) + len(alanines) + len(bad)
    assert s["input_rows"] == n_a + len(base)
    assert s["rejected_by_reason"] == {"sanitization_error": 1, "unparseable": 1, "too_small": 1}
    assert s["molecules"] == len(base) + 2 and s["duplicates"] == len(aspirin_forms) + len(base)
    rejects = read(tmp_path / "g.rejects.jsonl")
    assert {(r["source"], r["row"]) for r in rejects} == {("a.smi", n_a - 3), ("a.smi", n_a - 2), ("a.smi", n_a - 1)}
    rows = {sp: read(tmp_path / f) for sp, f in (("train", "g.jsonl"), ("test", "g_test.jsonl"))}
    keys = {sp: {r["metadata"]["inchikey"] for r in rs} for sp, rs in rows.items()}
    assert keys["train"] and keys["test"] and not keys["train"] & keys["test"]
    assert len(keys["train"] | keys["test"]) == s["molecules"]
    # every record of a molecule comes from its first row (source a), whatever source repeats it
    assert {r["metadata"]["source"] for rs in rows.values() for r in rs} == {"a.smi"}
    sides = {G.split_of(Chem.MolToInchiKey(Chem.MolFromSmiles(x)), 0.5) for x in alanines}
    assert len(sides) == 1
    # the split of a molecule does not depend on the other molecules or the source: b alone agrees
    alone = G.build([str(b)], str(tmp_path / "b.jsonl"), held_out_fraction=0.5, min_positives=2)
    keys_b = {r["metadata"]["inchikey"] for r in read(tmp_path / "b_test.jsonl")}
    alanine_keys = {Chem.MolToInchiKey(Chem.MolFromSmiles(x)) for x in alanines}
    assert alone["duplicates"] == 0 and keys_b == keys["test"] - alanine_keys


def test_cli_summary_and_errors(tmp_path):
    out = tmp_path / "g.jsonl"
    r = cli("trainer.converters", "grounding", "--input", CHEBI_TEST, "--limit", "40", "--output", str(out),
            "--held-out", str(tmp_path / "held.jsonl"), "--held-out-fraction", "0.3", "--no-progress")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["input_rows"] == 40 and summary["held_out"] == str(tmp_path / "held.jsonl")
    assert summary["records"]["test"] == len(read(tmp_path / "held.jsonl")) > 0
    assert summary["skipped_groups"] and "skipped" in r.stderr  # 40 rows: rare groups go, and it says so
    uspto = os.path.join(DATA, "uspto50k", "test.csv")
    for args, message in [(["--input", str(tmp_path / "missing.txt")], "not found"),
                          (["--input", uspto], "grounding reads"), (["--held-out-fraction", "1.5"], "held_out_fraction")]:
        r = cli("trainer.converters", "grounding", "--output", str(tmp_path / "e.jsonl"), "--no-progress", *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "e.jsonl").exists()


def test_installed_moses_and_qm9_sources(tmp_path):
    s = G.build(["moses_test"], str(tmp_path / "m.jsonl"), limit=30, min_positives=1)
    assert s["input_rows"] == 30 and s["rejected"] == 0 and s["molecules"] + s["duplicates"] == 30
    q = G.build(["qm9"], str(tmp_path / "q.jsonl"), limit=200, min_positives=1)
    # QM9 starts with its smallest molecules: under 5 heavy atoms they are rejected (the paper's filter)
    assert q["input_rows"] == 200 and q["rejected_by_reason"].get("too_small", 0) > 0
    assert q["molecules"] + q["duplicates"] + q["rejected"] == 200 and q["records"]["train"] > 0


@pytest.mark.slow
def test_preprocess_accepts_every_record_with_the_same_counts(chebi, tmp_path, ray_local):
    _, train, test, d = chebi
    address = ray_local.get_runtime_context().gcs_address
    for name, records in (("g.jsonl", train), ("g_test.jsonl", test)):
        out = tmp_path / name.replace(".jsonl", "")
        r = cli("graph.preprocess", "--input", str(d / name), "--output", str(out), "--format", "instructions",
                "--workers", "1", "--ray-address", address, "--no-progress")
        assert r.returncode == 0, r.stderr
        manifest = json.loads(r.stdout.strip().splitlines()[-1])
        table = read_table(str(out)).to_pylist()
        assert manifest["input_rows"] == manifest["accepted"] == len(table) == len(records), manifest
        for row, rec in zip(table, records):
            meta = json.loads(row["metadata"])
            assert meta == rec["metadata"] and row["smiles"] == meta["smiles"] and row["output_smiles"] is None
            if meta["question_type"] == "count_heavy_atoms":
                assert row["output"] == str(row["num_atoms"])
            elif meta["question_type"] == "count_brics_motifs":
                assert row["output"] == str(row["num_motifs"])
