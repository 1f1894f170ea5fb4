"""trainer.data: the train/test overlap figure on hand-made pairs (randomised SMILES, salts and charges that
standardise away, reactions in other orders and formats), --drop really de-leaking, and `prepare` on small
local copies of the public layouts built from the shipped samples."""
import csv
import json
import os
import random

import pytest
import selfies
from rdkit import Chem

from conftest import DATA, cli
from trainer import data

CHEBI_TRAIN = os.path.join(DATA, "chebi20", "train.txt")
USPTO_TRAIN = os.path.join(DATA, "uspto50k", "train.csv")
USPTO_TEST = os.path.join(DATA, "uspto50k", "test.csv")
HEADER = "CID\tSMILES\tdescription\n"


def rows(path, delimiter="\t"):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL))[1:]


def randomised(smiles: str, seed: int) -> str:
    """The same molecule written another way (fails the test set-up if RDKit gives the same text)."""
    random.seed(seed)
    from rdkit.Chem import rdBase

    rdBase.SeedRandomNumberGenerator(seed)
    out = Chem.MolToSmiles(Chem.MolFromSmiles(smiles), doRandom=True, canonical=False)
    for s in range(20):
        if out != smiles:
            break
        rdBase.SeedRandomNumberGenerator(seed + s + 1)
        out = Chem.MolToSmiles(Chem.MolFromSmiles(smiles), doRandom=True, canonical=False)
    assert out != smiles and Chem.CanonSmiles(out) == Chem.CanonSmiles(smiles)
    return out


def plain_key(smiles: str) -> str:
    return Chem.MolToInchiKey(Chem.MolFromSmiles(smiles))


def write_tsv(path, items):
    with open(path, "w") as f:
        f.write(HEADER + "".join(f"{cid}\t{smi}\t{text}\n" for cid, smi, text in items))
    return str(path)


@pytest.fixture(scope="module")
def chebi():
    """The first 60 shipped ChEBI-20 pairs that pass the paper's size filter (>= 5 heavy atoms, one
    fragment), all different molecules (checked with plain RDKit)."""
    ok = lambda m: m is not None and m.GetNumHeavyAtoms() >= 5 and len(Chem.GetMolFrags(m)) == 1
    picked = [r for r in rows(CHEBI_TRAIN) if ok(Chem.MolFromSmiles(r[1]))][:60]
    assert len({plain_key(r[1]) for r in picked}) == 60
    return picked


SALTS = [  # (train form, test form): a salt / charged form whose standardised parent is the train molecule
    ("CC(=O)Oc1ccccc1C(=O)O", "[Na+].CC(=O)Oc1ccccc1C([O-])=O"),            # aspirin, sodium salt
    ("CCN(CC)CCNC(=O)c1ccc(N)cc1", "Cl.CCN(CC)CCNC(=O)c1ccc(N)cc1"),         # procainamide hydrochloride
    ("OC(=O)CCc1ccccc1", "[O-]C(=O)CCc1ccccc1"),                              # a bare carboxylate
]


def molecule_pair(tmp_path, chebi):
    """Train: 30 ChEBI molecules + the salts' parents + L-alanine. Test: 10 of them randomised, the 3 salt
    forms, 10 other molecules, D-alanine (a stereoisomer: not the same molecule) and 2 unparseable rows."""
    train = [(r[0], r[1], r[2]) for r in chebi[:30]]
    train += [(f"s{i}", t, "salt parent") for i, (t, _) in enumerate(SALTS)] + [("ala", "C[C@H](N)C(=O)O", "L-alanine")]
    test = [(r[0], randomised(r[1], i), r[2]) for i, r in enumerate(chebi[:10])]
    test += [(f"s{i}", s, "salt form") for i, (_, s) in enumerate(SALTS)]
    test += [(r[0], r[1], r[2]) for r in chebi[30:40]]
    test += [("dala", "C[C@@H](N)C(=O)O", "D-alanine"), ("bad1", "C1CC(", "broken"), ("bad2", "xyz", "not SMILES")]
    return write_tsv(tmp_path / "train.txt", train), write_tsv(tmp_path / "test.txt", test)


def test_overlap_randomised_smiles_salts_and_charges(tmp_path, chebi):
    train, test = molecule_pair(tmp_path, chebi)
    r = data.overlap([train], test)
    assert r["test_rows"] == 26 and r["train_rows"] == 34  # every row counted, the unparseable ones too
    assert r["overlapping_rows"] == 13  # 10 randomised + 3 salt/charged forms; not D-alanine, not the new ones
    assert r["overlap_fraction"] == round(13 / 26, 6)
    assert r["unparseable_test_rows"] == 2 and sum(r["unparseable_by_reason"].values()) == 2
    assert {e["row"] for e in r["unparseable_examples"]} == {24, 25}
    # the same figure from a SMILES list as training input (another raw layout)
    smi = tmp_path / "train.smi"
    smi.write_text("".join(f"{s} {c}\n" for c, s, _ in [tuple(x) for x in rows(train)]))
    assert data.overlap([str(smi)], test)["overlapping_rows"] == 13
    # a training set that holds none of the test molecules
    other = write_tsv(tmp_path / "other.txt", [(r[0], r[1], r[2]) for r in chebi[45:60]])
    assert data.overlap([other], test)["overlapping_rows"] == 0
    # two training sets: the union counts
    assert data.overlap([other, train], test)["overlapping_rows"] == 13


def test_drop_writes_a_deleaked_training_file(tmp_path, chebi):
    train, test = molecule_pair(tmp_path, chebi)
    out = tmp_path / "deleaked.txt"
    r = cli("trainer.data", "overlap", "--train", train, "--test", test, "--drop", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["overlapping_rows"] == 13 and result["drop"]["dropped_rows"] == 13
    kept = rows(str(out))
    assert len(kept) == result["drop"]["kept_rows"] == 34 - 13
    assert out.read_text().startswith(HEADER)  # same layout as the input: it reads back as ChEBI-20
    assert data.overlap([str(out)], test)["overlapping_rows"] == 0
    assert {k[0] for k in kept} == {r[0] for r in chebi[10:30]} | {"ala"}


def uspto_pair(tmp_path):
    """Train: 20 USPTO-50K reactions. Test: 5 of them with the reactants reversed, randomised, maps stripped;
    3 with a train product but other reactants; 5 reactions not in train; one malformed reaction."""
    train = rows(USPTO_TRAIN, ",")[:20]
    other = rows(USPTO_TEST, ",")[:5]

    def plain(side):
        mols = [Chem.MolFromSmiles(p) for p in side.split(".")]
        for m in mols:
            for a in m.GetAtoms():
                a.SetAtomMapNum(0)
        return [Chem.MolToSmiles(m) for m in mols]

    test = []
    for i, (ident, cls, rxn) in enumerate(train[:5]):
        r, _, p = rxn.split(">")
        test.append([ident, cls, ".".join(randomised(s, i) for s in reversed(plain(r))) + ">CCO>" + ".".join(plain(p))])
    for ident, cls, rxn in train[5:8]:
        p = rxn.split(">")[2]
        test.append([ident, cls, "CC(=O)Cl.c1ccccc1>>" + p])
    test += other + [["bad", "1", "CC>>"]]
    path = tmp_path / "test.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "class", "reactants>reagents>production"])
        w.writerows(test)
    tr = tmp_path / "train.csv"
    with open(tr, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "class", "reactants>reagents>production"])
        w.writerows(train)
    return str(tr), str(path), train


def test_overlap_reactions_products_and_reactant_sets(tmp_path):
    train, test, train_rows = uspto_pair(tmp_path)
    r = data.overlap([train], test)
    assert r["test_rows"] == 14 and r["reaction_rows"] == 13 and r["unparseable_test_rows"] == 1
    assert r["overlapping_rows"] == 5  # order, writing, atom maps and reagents do not hide a reaction
    assert r["product_seen_rows"] == 8 and r["reactant_set_seen_rows"] == 5
    # the same reactions as Mol-Instructions retrosynthesis records (SELFIES, product in, reactants out)
    recs = []
    for ident, cls, rxn in train_rows[:3]:
        rs, _, p = rxn.split(">")
        strip = lambda s: ".".join(selfies.encoder(Chem.MolToSmiles(_unmapped(x))) for x in s.split("."))
        recs.append({"instruction": "Which reactants?", "input": strip(p), "output": strip(rs),
                     "metadata": {"task": "retrosynthesis", "split": "test"}})
    recs.append({"instruction": "Which reactants?", "input": selfies.encoder("CCCCCCO"), "output": selfies.encoder("CCCCCC=O"),
                 "metadata": {"task": "retrosynthesis", "split": "test"}})
    jl = tmp_path / "retro.jsonl"
    jl.write_text("".join(json.dumps(x) + "\n" for x in recs))
    r2 = data.overlap([train], str(jl))
    assert (r2["test_rows"], r2["overlapping_rows"], r2["reaction_rows"]) == (4, 3, 4)
    # --drop on the reaction file keeps the CSV layout and removes exactly the 5 shared reactions
    out = tmp_path / "deleaked.csv"
    res = data.drop(data.read_rows(train, data.Keyer()), data.read_rows(test, data.Keyer()), str(out))
    assert res["dropped_rows"] == 5 and len(rows(str(out), ",")) == 15
    assert data.overlap([str(out)], test)["overlapping_rows"] == 0


def _unmapped(smiles):
    m = Chem.MolFromSmiles(smiles)
    for a in m.GetAtoms():
        a.SetAtomMapNum(0)
    return m


def test_bad_inputs_are_one_line_errors(tmp_path):
    r = cli("trainer.data", "overlap", "--train", str(tmp_path / "missing.txt"), "--test", USPTO_TEST)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: input file not found")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = cli("trainer.data", "prepare", "mol-instructions", "--out", str(tmp_path / "o"), env=env)
    assert r.returncode == 2 and "cannot fetch dataset 'zjunlp/Mol-Instructions'" in r.stderr
    assert "Traceback" not in r.stderr
    pt = tmp_path / "PubChem324kV2"
    pt.mkdir()
    (pt / "train.pt").write_bytes(b"not unpickled")
    with pytest.raises(data.InputError, match="does not unpickle"):
        data.prepare("pubchem324k", str(pt), str(tmp_path / "o"))
    with pytest.raises(data.InputError, match="no chebi20 files"):
        data.prepare("chebi20", str(tmp_path), str(tmp_path / "o"))


# ------------------------------------------------------------------------------ prepare (Ray: slow)


def molinst_layout(root, chebi):
    """data/Molecule-oriented_Instructions/ with forward, molecular description and property files (JSON
    arrays, SELFIES, metadata.split) built from the shipped samples; reagent/design/retrosynthesis absent."""
    folder = root / "data" / "Molecule-oriented_Instructions"
    folder.mkdir(parents=True)
    sf = lambda s: ".".join(selfies.encoder(Chem.MolToSmiles(_unmapped(x))) for x in s.split("."))
    rxns = rows(USPTO_TRAIN, ",")[:16]
    fwd = [{"instruction": "Product?", "input": sf(r[2].split(">")[0]), "output": sf(r[2].split(">")[2]),
            "metadata": {"task": "forward reaction prediction", "split": "train" if i < 12 else "test"}}
           for i, r in enumerate(rxns)]
    fwd += [dict(fwd[i], metadata={"task": "forward reaction prediction", "split": "test"}) for i in (0, 1)]  # 2 leaks
    fwd.append({"instruction": "Product?", "input": sf("CCO"), "metadata": {"split": "train"}})  # no output: reject
    cap = [{"instruction": "Describe.", "input": sf(r[1]), "output": r[2],
            "metadata": {"task": "molecular description generation", "split": "train" if i < 12 else "test"}}
           for i, r in enumerate(chebi[:16])]
    cap += [dict(cap[i], input=selfies.encoder(randomised(chebi[i][1], i), strict=False),
                 metadata={"task": "molecular description generation", "split": "test"}) for i in (2, 3, 4)]
    prop = [{"instruction": "HOMO?", "input": sf(r[1]), "output": round(-0.2 - i / 100, 4),
             "metadata": {"task": "property prediction", "split": "train" if i < 6 else "test"}}
            for i, r in enumerate(chebi[20:28])]
    for name, recs in (("forward_reaction_prediction.json", fwd), ("molecular_description_generation.json", cap),
                       ("property_prediction.json", prop)):
        (folder / name).write_text(json.dumps(recs, indent=1))
    return str(root)


@pytest.mark.slow
def test_prepare_local_layouts_report_and_drop(tmp_path, chebi, ray_local):
    out = tmp_path / "prepared"
    rep = data.prepare("mol-instructions", molinst_layout(tmp_path / "molinst", chebi), str(out))
    s = rep["splits"]
    assert sorted(s) == sorted(f"molinst_{t}_{x}" for t in ("forward", "molcap", "property") for x in ("train", "test"))
    assert s["molinst_forward_train"]["preprocess"]["accepted"] == 12
    assert s["molinst_forward_train"]["conversion"]["rejected_by_reason"] == {"missing_field": 1}
    assert s["molinst_forward_test"]["preprocess"]["accepted"] == 6
    assert s["molinst_property_test"]["preprocess"]["accepted"] == 2  # numeric outputs read as text
    assert set(rep["sources"]["mol-instructions"]["missing"]) == {"reagent_prediction.json", "retrosynthesis.json",
                                                                   "description_guided_molecule_design.json"}
    pairs = {(o["train"], o["eval"]): o for o in rep["overlap"]}
    assert pairs[("molinst_forward_train", "molinst_forward_test")]["overlapping_rows"] == 2
    assert pairs[("molinst_molcap_train", "molinst_molcap_test")]["overlapping_rows"] == 3
    assert pairs[("molinst_property_train", "molinst_property_test")]["overlapping_rows"] == 0
    assert pairs[("any", "molinst_molcap_test")]["test_rows"] == 7

    # ChEBI-20 layout into the same folder: its test set also meets Mol-Instructions' training splits
    chebi_dir = tmp_path / "chebi"
    chebi_dir.mkdir()
    write_tsv(chebi_dir / "train.txt", chebi[30:50])
    write_tsv(chebi_dir / "validation.txt", chebi[50:55])
    test_rows = chebi[30:35] + [(r[0], randomised(r[1], 7), r[2]) for r in chebi[5:7]] + chebi[55:60]
    write_tsv(chebi_dir / "test.txt", test_rows)
    rep = data.prepare("chebi20", str(chebi_dir), str(out))
    pairs = {(o["train"], o["eval"]): o for o in rep["overlap"]}
    assert pairs[("chebi20_molcap_train", "chebi20_molcap_test")]["overlapping_rows"] == 5
    assert pairs[("chebi20_molcap_train", "chebi20_molcap_validation")]["overlapping_rows"] == 0
    assert pairs[("molinst_molcap_train", "chebi20_molcap_test")]["overlapping_rows"] == 2  # chebi[5:7]
    assert pairs[("any", "chebi20_molcap_test")]["overlapping_rows"] == 7
    assert "molinst_forward_test" in rep["splits"]  # the earlier prepare stays in the report
    md = (out / "report.md").read_text()
    assert "| chebi20_molcap_train | chebi20_molcap_test | 12 | 5 | 41.7% | 0 |" in md
    assert json.loads((out / "report.json").read_text())["overlap"] == rep["overlap"]

    # --drop on a preprocessed folder: a folder again, the dropped rows as test_overlap rejects
    from graph.preprocess import read_table

    deleaked = tmp_path / "deleaked"
    r = cli("trainer.data", "overlap", "--train", str(out / "chebi20_molcap_train"), "--test",
            str(out / "chebi20_molcap_test"), "--drop", "--out", str(deleaked))
    assert r.returncode == 0, r.stderr
    m = json.loads((deleaked / "manifest.json").read_text())
    assert (m["accepted"], m["rejected_by_reason"].get("test_overlap")) == (15, 5)
    assert m["accepted"] + m["rejected"] == m["input_rows"] == 20
    assert read_table(str(deleaked)).num_rows == 15
    assert data.overlap([str(deleaked)], str(out / "chebi20_molcap_test"))["overlapping_rows"] == 0

    # the tasks helper the experiments runner calls: the figure into a report file
    from trainer.dataset import tasks

    path = tmp_path / "overlap.json"
    res = tasks.record_overlap({"train": str(out / "chebi20_molcap_train")}, {"test": str(out / "chebi20_molcap_test")}, str(path))
    assert res["test"]["overlapping_rows"] == 5 and "5 of 12 test rows (41.7%)" in res["test"]["summary"]
    assert json.loads(path.read_text())["test"]["overlapping_rows"] == 5


@pytest.mark.slow
def test_prepare_pubchem324k_text_layout(tmp_path, chebi, ray_local):
    root = tmp_path / "PubChem324k"
    for split, items in (("pretrain", chebi[:8]), ("test", chebi[6:10] + [("999", "", "no smiles file")])):
        for sub in ("smiles", "text"):
            (root / split / sub).mkdir(parents=True)
        for cid, smi, text in items:
            if smi:
                (root / split / "smiles" / f"smiles_{cid}.txt").write_text(smi + "\n")
            (root / split / "text" / f"text_{cid}.txt").write_text(text + "\nsecond line\n")
    rep = data.prepare("pubchem324k", str(tmp_path), str(tmp_path / "out"))
    s = rep["splits"]
    assert s["pubchem324k_molcap_pretrain"]["role"] == "train" and s["pubchem324k_molcap_test"]["role"] == "eval"
    assert s["pubchem324k_molcap_test"]["conversion"]["rejected_by_reason"] == {"missing_field": 1}
    (o,) = rep["overlap"]
    assert (o["train"], o["eval"], o["test_rows"], o["overlapping_rows"]) == (
        "pubchem324k_molcap_pretrain", "pubchem324k_molcap_test", 4, 2)
    rec = json.loads((tmp_path / "out" / "pubchem324k_molcap_pretrain.jsonl").read_text().splitlines()[0])
    assert rec["output"].endswith("second line")  # MolCA joins a description's lines with spaces
