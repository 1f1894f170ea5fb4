"""trainer.converters on real files: canonical SELFIES, reaction layouts, QM9 units, row accounting, errors,
and the records read back by graph.preprocess (JSONL and Parquet)."""
import collections
import csv
import json
import os
import re

import pyarrow as pa
import pytest
import pyarrow.parquet as pq
import selfies
from rdkit import Chem

from conftest import DATA, cli
from graph.chem import Standardizer
from graph.preprocess import read_table
from trainer import converters

CHEBI = os.path.join(DATA, "chebi20", "test.txt")
USPTO = os.path.join(DATA, "uspto50k", "test.csv")
REAGENTS = os.path.join(DATA, "reagent_sample", "reactions.csv")
ATOM_MAP = re.compile(r":\d+\]")


def convert(tmp_path, task, *args, name=None):
    """Run the CLI; return (summary, records, rejects)."""
    out = tmp_path / f"{name or task}.jsonl"
    r = cli("trainer.converters", task, "--output", str(out), "--no-progress", *args)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    rejects = [json.loads(line) for line in (tmp_path / f"{name or task}.rejects.jsonl").read_text().splitlines()]
    assert summary["input_rows"] == summary["converted"] + summary["rejected"] == len({r["metadata"]["row"] for r in records}) + len(rejects)
    assert summary["rejected_by_reason"] == dict(collections.Counter(r["reason"] for r in rejects))
    return summary, records, rejects


def decode(text: str) -> str:
    return ".".join(Chem.CanonSmiles(selfies.decoder(part)) for part in text.split("."))


def canon(smiles: str) -> str:
    """Canonical SMILES per '.'-component, keeping the written order (as the converters do)."""
    return ".".join(Chem.CanonSmiles(part) for part in smiles.split("."))


def inchis(smiles: str) -> list[str]:
    return [Chem.MolToInchi(Chem.MolFromSmiles(part)) for part in smiles.split(".")]


def source_rows(path, delimiter=",", quoting=csv.QUOTE_MINIMAL):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter=delimiter, quoting=quoting))[1:]


def test_molcap_canonical_selfies_round_trip(tmp_path):
    summary, records, rejects = convert(tmp_path, "molcap", "--input", CHEBI, "--limit", "80")
    assert summary["input_rows"] == 80 and summary["converted"] >= 75
    assert {r["reason"] for r in rejects} <= {"too_small"}  # e.g. free ions; the 5-heavy-atom minimum
    src = source_rows(CHEBI, "\t", csv.QUOTE_NONE)
    std = Standardizer()
    for rec in records:
        cid, smiles, text = src[rec["metadata"]["row"]]
        parent = Chem.MolToSmiles(std.parent(smiles))
        assert decode(rec["input"]) == rec["metadata"]["input_smiles"] == parent
        assert rec["output"] == text.strip() and rec["metadata"]["id"] == cid
        assert rec["metadata"]["task"] == "molcap" and rec["metadata"]["source"] == "test.txt"
        assert rec["instruction"] in converters.INSTRUCTIONS["molcap"]
    assert len({r["instruction"] for r in records}) > 1  # phrasings vary per row ...
    again = tmp_path / "again.jsonl"  # ... but a rerun writes the same bytes
    converters.run("molcap", CHEBI, str(again), limit=80, progress=False)
    assert again.read_bytes() == (tmp_path / "molcap.jsonl").read_bytes()


def test_forward_and_retrosynthesis_swap_and_strip_maps(tmp_path):
    _, fwd, _ = convert(tmp_path, "forward", "--input", USPTO, "--limit", "60")
    _, retro, _ = convert(tmp_path, "retrosynthesis", "--input", USPTO, "--limit", "60")
    assert len(fwd) == len(retro) == 60
    src = source_rows(USPTO)
    for f, r in zip(fwd, retro):
        assert f["metadata"]["row"] == r["metadata"]["row"]
        reactants, reagents, product = src[f["metadata"]["row"]][2].split(">")
        assert ATOM_MAP.search(reactants) and not reagents  # the source is atom-mapped, reagent-free
        for text in (f["metadata"]["input_smiles"], f["metadata"]["output_smiles"], decode(f["input"]), decode(f["output"])):
            assert not ATOM_MAP.search(text)
        assert len(f["input"].split(".")) == len(reactants.split(".")) == len(r["output"].split("."))
        assert (f["input"], f["output"]) == (r["output"], r["input"])
        assert f["metadata"]["input_smiles"] == r["metadata"]["output_smiles"] == decode(f["input"])
        unmapped = Chem.MolFromSmiles(product)
        for atom in unmapped.GetAtoms():
            atom.SetAtomMapNum(0)
        assert decode(f["output"]) == f["metadata"]["output_smiles"] == Chem.CanonSmiles(Chem.MolToSmiles(unmapped))


@pytest.mark.parametrize("sample", [REAGENTS, os.path.join(DATA, "reagent_sample", "held_out.csv")])
def test_reagent_sample_and_uspto50k_without_reagents(tmp_path, sample):
    summary, records, _ = convert(tmp_path, "reagent", "--input", sample)
    src = source_rows(sample)
    assert summary["converted"] == summary["input_rows"] == len(src) >= 8
    for rec, row in zip(records, src):
        reactants, reagents, product = row[2].split(">")
        # the shipped sample itself: every SMILES parses, no product element exceeds what the reactants hold
        elements = [collections.Counter(a.GetSymbol() for a in Chem.MolFromSmiles(s).GetAtoms()) for s in (reactants, product)]
        assert Chem.MolFromSmiles(reagents) is not None and not elements[1] - elements[0], row[0]
        left, right = rec["input"].split(">>")
        assert decode(left) == canon(reactants) and decode(right) == canon(product)
        assert decode(rec["output"]) == rec["metadata"]["output_smiles"]
        # the same molecules, though standardised (RDKit's normaliser writes DMSO as C[S+](C)[O-])
        assert inchis(rec["metadata"]["output_smiles"]) == inchis(reagents)
        assert len(rec["output"].split(".")) == len(reagents.split("."))
    if sample != REAGENTS:  # held out: no reaction of the training sample again
        assert not {r[2] for r in src} & {r[2] for r in source_rows(REAGENTS)}
        return
    r = cli("trainer.converters", "reagent", "--input", USPTO, "--output", str(tmp_path / "none.jsonl"), "--no-progress")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["input_rows"] == summary["rejected"] == 200 and summary["converted"] == 0
    assert summary["rejected_by_reason"] == {"no_reagents": 200} and "USPTO-50K" in r.stderr
    assert (tmp_path / "none.jsonl").read_text() == ""
    assert len((tmp_path / "none.rejects.jsonl").read_text().splitlines()) == 200


def test_property_qm9_units_and_values(tmp_path):
    summary, records, _ = convert(tmp_path, "property", "--limit", "12")
    assert summary["converted"] == 12 and summary["records"] == len(records) == 36  # C, N, O... kept (1 heavy atom)
    with open(os.path.join(converters.qm9_folder(), "qm9_part1.csv"), newline="") as f:
        qm9 = [row for row, _ in zip(csv.DictReader(f), range(12))]
    by = {(r["metadata"]["id"], r["metadata"]["property"]): r for r in records}
    columns = {"homo": ("HOMO_au", "HOMO energy"), "lumo": ("LUMO_au", "LUMO energy"),
               "gap": ("HOMO_LUMO_gap_au", "HOMO-LUMO gap")}
    for row in qm9:
        for prop, (col, name) in columns.items():
            rec = by[(row["XYZ_file"].removesuffix(".xyz"), prop)]
            assert rec["metadata"]["unit"] == "Hartree" and name in rec["instruction"] and "Hartree" in rec["instruction"]
            assert re.fullmatch(r"-?\d+\.\d{4}", rec["output"]) and float(rec["output"]) == round(float(row[col]), 4)
            assert decode(rec["input"]) == rec["metadata"]["input_smiles"] == Chem.CanonSmiles(row["SMILES"])
    assert all(-1 < float(by[(k, "homo")]["output"]) < 0 for k, _ in by)  # Hartree magnitudes, not eV
    summary, records, _ = convert(tmp_path, "property", "--limit", "5", "--properties", "homo,lumo", name="two")
    assert len(records) == 10 and {r["metadata"]["property"] for r in records} == {"homo", "lumo"}


def test_bad_rows_are_rejects_and_bad_files_are_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    rows = [("1\tCC(=O)Nc1ccc(O)cc1\tThe molecule is paracetamol.", None),
            ("2\tC1CC( broken\tA broken ring.", "unparseable"),
            ("3\tCCCCCCO", "malformed_row"),
            ("4\tc1ccccc1O\t  ", "missing_field"),
            ("5\tCC(C)(C)(C)(C)C\tPentavalent carbon.", "sanitization_error"),
            ("6\tCCO\tEthanol is too small.", "too_small")]
    bad.write_text("CID\tSMILES\tdescription\n" + "\n".join(r for r, _ in rows) + "\n")
    summary, records, rejects = convert(tmp_path, "molcap", "--input", str(bad))
    assert summary["input_rows"] == 6 and summary["converted"] == 1 and summary["rejected"] == 5
    assert [(r["row"], r["reason"]) for r in rejects] == [(i, why) for i, (_, why) in enumerate(rows) if why]
    bad_rxn = tmp_path / "bad.csv"
    bad_rxn.write_text("id,class,reactants>reagents>production\na,1,CCO.CC(=O)Cl>>CCOC(C)=O\nb,1,CCO>CCOC\n"
                       "c,1\nd,1,C1CC(>>CC\n")
    summary, _, rejects = convert(tmp_path, "forward", "--input", str(bad_rxn))
    assert [r["reason"] for r in rejects] == ["bad_reaction", "malformed_row", "unparseable"] and summary["converted"] == 1
    for args, words in [(("molcap", "--input", str(tmp_path / "missing.txt")), "not found"),
                        (("molcap", "--input", USPTO), "ChEBI-20"), (("forward", "--input", CHEBI), "USPTO"),
                        (("property", "--input", USPTO), "QM9")]:
        r = cli("trainer.converters", *args, "--output", str(tmp_path / "err.jsonl"))
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "err.jsonl").exists()


def test_preprocess_reads_converter_output_jsonl_and_parquet(tmp_path, ray_local):
    records = []
    for task, args in [("molcap", ("--input", CHEBI, "--limit", "15")), ("forward", ("--input", USPTO, "--limit", "15")),
                       ("retrosynthesis", ("--input", USPTO, "--limit", "15")), ("reagent", ("--input", REAGENTS)),
                       ("property", ("--limit", "4"))]:
        records += convert(tmp_path, task, *args)[1]
    jsonl = tmp_path / "all.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    parquet = tmp_path / "all.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet, row_group_size=20)  # several batches to stream
    address = ray_local.get_runtime_context().gcs_address  # attach to the module's cluster, not a new one
    for path in (jsonl, parquet):
        out = tmp_path / f"pre-{path.suffix[1:]}"
        r = cli("graph.preprocess", "--input", str(path), "--output", str(out), "--workers", "1",
                "--ray-address", address, "--no-progress")
        assert r.returncode == 0, r.stderr
        manifest = json.loads(r.stdout.strip().splitlines()[-1])
        assert manifest["input_rows"] == len(records)
        table = read_table(str(out)).to_pylist()
        # property inputs under 5 heavy atoms stay (instruction inputs are components, no size filter)
        assert manifest["accepted"] == len(table) == len(records), manifest
        checked = 0
        for row in table:
            meta = json.loads(row["metadata"])
            assert row["smiles"] == meta["input_smiles"].replace(">>", ".")
            if "output_smiles" in meta and meta["output_smiles"] is not None:
                assert row["output_smiles"] == meta["output_smiles"], meta
                checked += 1
        assert checked == sum(1 for r in records if r["metadata"].get("output_smiles")) == 15 + 15 + 16
