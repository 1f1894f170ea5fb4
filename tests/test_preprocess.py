"""graph.preprocess end to end on a real local Ray cluster: accounting, formats, determinism, errors."""
import gzip
import json
import os

import pyarrow.parquet as pq
import pytest
import selfies
from rdkit import Chem

from conftest import DATA, cli
from graph.dataset import MoleculeDataset, ShardDataset
from graph.formats import InputError
from graph.preprocess import read_table, run

MESSY = [  # (smiles, expected reason or None for accepted)
    ("CC(=O)Oc1ccccc1C(=O)[O-].[Na+] aspirin_sodium", None),
    ("", "empty"),
    ("C1CC( broken", "unparseable"),
    ("CCO ethanol", "too_small"),
    ("CC(C)(C)(C)(C)C", "sanitization_error"),
    ("Oc1ccccc1 phenol", None),
    ("[Na+].[Cl-] salt", "too_small"),
    ("CN1CCC[C@H]1c1cccnc1.Cl nicotine_hcl", None),
    ("Cc1cccc1", "sanitization_error"),
    ("xyz", "unparseable"),
    ("C/C=C/C(=O)O crotonic", None),
    ("CC(=O)Nc1ccc(O)cc1 paracetamol", None),
]


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def _rejects(out):
    with open(os.path.join(out, "rejects.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_every_row_accounted_for(tmp_path, ray_local):
    rows = MESSY * 3
    src = _write(tmp_path / "messy.smi", [s for s, _ in rows])
    out = str(tmp_path / "out")
    m = run(src, out, chunk_size=5, progress=False)
    expected_ok = [i for i, (_, r) in enumerate(rows) if r is None]
    assert m["input_rows"] == len(rows) == m["accepted"] + m["rejected"]
    assert m["accepted"] == len(expected_ok)
    table = read_table(out)
    assert table.column("row").to_pylist() == expected_ok  # input order, nothing lost or duplicated
    rejects = _rejects(out)
    assert [(r["row"], r["reason"]) for r in rejects] == [(i, r) for i, (_, r) in enumerate(rows) if r is not None]
    reasons = {}
    for _, r in rows:
        if r:
            reasons[r] = reasons.get(r, 0) + 1
    assert m["rejected_by_reason"] == reasons
    # accepted rows: standardised SMILES, SELFIES that decodes to it, ids and counts
    t = table.slice(0, 4).to_pylist()
    assert [r["smiles"] for r in t] == ["CC(=O)Oc1ccccc1C(=O)O", "Oc1ccccc1", "CN1CCC[C@H]1c1cccnc1", "C/C=C/C(=O)O"]
    assert [r["id"] for r in t] == ["aspirin_sodium", "phenol", "nicotine_hcl", "crotonic"]
    assert all(Chem.CanonSmiles(selfies.decoder(r["selfies"])) == r["smiles"] for r in t)
    assert [r["num_atoms"] for r in t] == [13, 7, 12, 6] and [r["num_motifs"] for r in t] == [4, 1, 2, 2]


def test_same_output_for_one_and_two_workers(tmp_path, ray_local):
    src = os.path.join(DATA, "chebi20", "train.txt")
    outs = []
    for w in (1, 2):
        out = str(tmp_path / f"w{w}")
        m = run(src, out, workers=w, chunk_size=40, progress=False)
        assert m["workers"] == w
        outs.append(out)
    assert read_table(outs[0]).equals(read_table(outs[1]))
    assert _rejects(outs[0]) == _rejects(outs[1])
    t = read_table(outs[0])
    assert t.num_rows + len(_rejects(outs[0])) == 400
    assert set(t.column_names) >= {"row", "id", "text", "smiles", "selfies", "num_atoms", "num_motifs"}


def test_uspto_reactions(tmp_path, ray_local):
    out = str(tmp_path / "rxn")
    m = run(os.path.join(DATA, "uspto50k", "test.csv"), out, chunk_size=64, progress=False)
    assert m["format"] == "uspto" and m["input_rows"] == 200
    t = read_table(out).to_pylist()
    assert len(t) >= 195
    for r in t[:50]:
        assert ":" not in r["reaction"]  # atom maps stripped
        react, reag, prod = r["reaction"].split(">")
        assert react == r["reactants_smiles"] and prod == r["products_smiles"] and reag == r["reagents_smiles"]
        assert len(r["reactants_mol_num_atoms"]) == len(react.split("."))  # one graph per component
        assert r["reactants_num_atoms"] == sum(r["reactants_mol_num_atoms"])
    # the first reaction of the file: an amide coupling with two reactants, one product
    assert t[0]["reactants_smiles"].count(".") == 1 and "." not in t[0]["products_smiles"]
    ds = ShardDataset(out, prefix="reactants_")
    graphs = ds.graphs(0)
    assert [g.num_atoms for g in graphs] == t[0]["reactants_mol_num_atoms"]
    mols = MoleculeDataset(out, prefix="reactants_")  # every reactant of every reaction, in order
    sizes = [n for r in t for n in r["reactants_mol_num_atoms"]]
    assert len(mols) == len(sizes) > len(t)
    assert [int(mols[i].num_atoms) for i in range(len(mols))] == sizes
    assert mols.item_rows().tolist() == [r["row"] for r in t for _ in r["reactants_mol_num_atoms"]]


def test_instructions_with_bad_records(tmp_path, ray_local):
    good = {"instruction": "Describe this molecule.", "input": selfies.encoder("CC(=O)Oc1ccccc1C(=O)O"),
            "output": "It is aspirin.", "metadata": {"task": "molcap"}}
    forward = {"instruction": "Predict the product.",
               "input": selfies.encoder("CC(=O)O") + "." + selfies.encoder("OCC"),
               "output": selfies.encoder("CC(=O)OCC"), "metadata": {}}
    lines = [json.dumps(good), json.dumps(forward),
             json.dumps({"instruction": "x", "input": "[C][Xx][", "output": "y"}),  # invalid SELFIES
             json.dumps({"instruction": "x", "output": "y"}),  # missing input
             "{not json", json.dumps(["a list"]),
             json.dumps({"instruction": "Design a molecule.", "input": "a small ester", "output": forward["output"]})]
    src = _write(tmp_path / "inst.jsonl", lines)
    out = str(tmp_path / "inst")
    m = run(src, out, chunk_size=3, progress=False)
    assert m["format"] == "instructions" and m["input_rows"] == 7 and m["accepted"] == 3
    assert [(r["row"], r["reason"]) for r in _rejects(out)] == [
        (2, "invalid_selfies"), (3, "missing_field"), (4, "malformed_row"), (5, "malformed_row")]
    t = read_table(out).to_pylist()
    assert t[0]["smiles"] == "CC(=O)Oc1ccccc1C(=O)O" and json.loads(t[0]["metadata"]) == {"task": "molcap"}
    assert t[1]["smiles"] == "CC(=O)O.CCO" and t[1]["mol_num_atoms"] == [4, 3]  # every reactant kept, in order
    assert t[1]["output_smiles"] == "CCOC(C)=O"
    assert t[2]["num_atoms"] == 0 and t[2]["smiles"] == ""  # prose input: no molecule


def test_csv_gzip_and_column_errors(tmp_path, ray_local):
    path = tmp_path / "mols.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("name,mol_smiles,logp\nasp,CC(=O)Oc1ccccc1C(=O)O,1.2\nbad,C1CC(,0\nshort,CCCCCC\n")
    with pytest.raises(InputError, match="mol_smiles"):
        run(str(path), str(tmp_path / "a"), progress=False)  # no standard SMILES column name
    m = run(str(path), str(tmp_path / "b"), smiles_column="mol_smiles", progress=False)
    assert (m["input_rows"], m["accepted"]) == (3, 1)
    assert m["rejected_by_reason"] == {"unparseable": 1, "malformed_row": 1}
    assert json.loads(read_table(str(tmp_path / "b")).column("extra")[0].as_py()) == {"name": "asp", "logp": "1.2"}


def test_cli_errors_are_clear(tmp_path):
    r = cli("graph.preprocess", "--input", str(tmp_path / "missing.smi"), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "input file not found" in r.stderr and "Traceback" not in r.stderr
    broken = tmp_path / "broken.smi.gz"
    broken.write_bytes(b"this is not gzip")
    r = cli("graph.preprocess", "--input", str(broken), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    csv_path = _write(tmp_path / "x.csv", ["name,value", "a,1"])
    r = cli("graph.preprocess", "--input", csv_path, "--output", str(tmp_path / "o"), "--format", "csv")
    assert r.returncode == 2 and "no SMILES column" in r.stderr and "--smiles-column" in r.stderr


def test_changed_settings_are_not_resumed(tmp_path, ray_local):
    src = _write(tmp_path / "m.smi", [s for s, _ in MESSY])
    out = str(tmp_path / "o")
    run(src, out, chunk_size=5, progress=False)
    with pytest.raises(InputError, match="other settings"):
        run(src, out, chunk_size=4, progress=False)


def test_shard_dataset_reads_lazily(tmp_path, ray_local):
    out = str(tmp_path / "o")
    run(os.path.join(DATA, "chebi20", "test.txt"), out, chunk_size=50, progress=False)
    ds = ShardDataset(out)
    t = read_table(out)
    assert len(ds) == t.num_rows
    i = len(ds) - 7
    d, rec = ds[i], ds.record(i)
    assert rec["row"] == t.column("row")[i].as_py() == int(d.row)
    assert rec["text"] == t.column("text")[i].as_py()
    assert int(d.num_atoms) == rec["num_atoms"] and d.num_nodes == rec["num_atoms"] + rec["num_motifs"] + 1
    assert len(ds._open) == 1  # only the shard holding row i was opened
    assert all(f.endswith(".parquet") for f in os.listdir(out) if f.startswith("shard-"))
    assert len(os.listdir(os.path.join(out, "_arrow"))) == 1


def test_json_array_streams_across_buffer_boundaries(tmp_path):
    from graph import formats

    recs = [{"instruction": "i" * k, "input": "[C][C][O]", "output": str(k)} for k in range(50)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(recs, indent=2))
    with open(path) as f:  # tiny blocks: every object straddles a buffer boundary
        assert list(formats._json_array(f, str(path), block=7)) == recs
    path.write_text(json.dumps(recs)[:-30])
    with open(path) as f, pytest.raises(InputError, match="JSON array"):
        list(formats._json_array(f, str(path), block=64))
