"""`python -m trainer.converters TASK --input PATH`: source data sets to Mol-Instructions JSONL records.

One record per usable input row: {"instruction", "input", "output", "metadata"}, molecules as SELFIES of
standardised canonical SMILES (graph.chem), so `graph.preprocess` reads the records back unchanged.
Tasks: molcap (ChEBI-20 TSV), forward / retrosynthesis / reagent (USPTO layout CSV), property (QM9 from
the `qm9pack` package). Every input row is either written to OUT.jsonl or to OUT.rejects.jsonl
(`row`, `input`, `reason`, `detail`); the last stdout line is a JSON summary. Exit code 2: unreadable input.
"""
from __future__ import annotations

import argparse
import collections
import csv
import glob
import importlib.util
import itertools
import json
import math
import os
import sys
import zlib
from typing import Callable, Iterator

from rdkit import Chem

from graph import chem
from graph.atomic import atomic_writer
from graph.chem import Limits, Reject, Standardizer
from graph.formats import InputError

TASKS = ("molcap", "forward", "retrosynthesis", "reagent", "property", "grounding")  # grounding: trainer/dataset/grounding.py
NO_REAGENTS = "no_reagents"
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # QM9 rows carry coordinates and frequencies

# Our own phrasings in the Mol-Instructions style; one is picked per row from its id (stable across reruns).
INSTRUCTIONS = {
    "molcap": [
        "Describe the molecule below: its structure, chemical class and any known roles.",
        "Write a short description of the following molecule.",
        "What is this molecule? Summarise its structure and what it is known for.",
        "Explain in a few sentences what kind of compound the following molecule is.",
    ],
    "forward": [
        "Predict the main product of a reaction between the compounds below.",
        "Given these starting materials, which product is obtained?",
        "What is the expected product when the compounds below react?",
        "Complete the reaction: give the product of the reactants listed below.",
    ],
    "retrosynthesis": [
        "Suggest reactants that could be used to make the following product.",
        "Propose a one-step retrosynthesis for this molecule: which reactants form it?",
        "Which starting materials would give the molecule below in a single step?",
        "Work backwards from this product and list plausible reactants.",
    ],
    "reagent": [
        "Which reagents, catalysts or solvents would bring about the following reaction?",
        "Suggest suitable reagents for this transformation.",
        "Given the reactants and the product, name the reagents that make this reaction work.",
    ],
    "property": [
        "What is the {name} of this molecule? Give the value in {unit}.",
        "Report the {name} (in {unit}) of the molecule below, as computed by DFT for QM9.",
        "Predict the {name} of the following molecule, in {unit}.",
    ],
}

# QM9 (qm9pack) columns: the suffix `_au` is atomic units, i.e. Hartree for energies (HOMO ~ -0.25).
QM9_UNIT = "Hartree"
QM9_PROPERTIES = {"homo": ("HOMO_au", "HOMO energy"), "lumo": ("LUMO_au", "LUMO energy"),
                  "gap": ("HOMO_LUMO_gap_au", "HOMO-LUMO gap")}
QM9_ID, QM9_SMILES = "XYZ_file", "SMILES"


def instruction(task: str, key: str, **fmt) -> str:
    options = INSTRUCTIONS[task]
    return options[zlib.crc32(f"{task}:{key}".encode()) % len(options)].format(**fmt)


def _canonical(mol) -> str:
    # Written, parsed and written again: a molecule read from atom-mapped SMILES can come out with other
    # (equivalent) ring-stereo tags than a fresh parse gives, and preprocessing and evaluation parse fresh
    # text. Seen on 0.6% of USPTO-50K reactions (trans-1,4-cyclohexanes).
    return Chem.MolToSmiles(chem.parse_smiles(Chem.MolToSmiles(mol)))


def _texts(mols: list) -> tuple[str, str]:
    """'.'-joined canonical SMILES and SELFIES of molecules, in the given order."""
    smiles = [_canonical(m) for m in mols]
    return ".".join(smiles), ".".join(chem.to_selfies(s) for s in smiles)


def _meta(task: str, source: str, ident: str, row: int, **extra) -> dict:
    return {"task": task, "source": source, "id": ident, "row": row, **extra}


# ------------------------------------------------------------------------------ one row -> records


def molcap_record(cid: str, smiles: str, text: str, std: Standardizer, source: str = "", row: int = -1) -> dict:
    if not text.strip():
        raise Reject(chem.MISSING_FIELD, "description")
    smi, sf = _texts([std.parent(smiles)])
    return {"instruction": instruction("molcap", cid), "input": sf, "output": text.strip(),
            "metadata": _meta("molcap", source, cid, row, input_smiles=smi)}


def reaction_record(task: str, ident: str, cls: str, reaction: str, std: Standardizer,
                    source: str = "", row: int = -1) -> dict:
    """forward, retrosynthesis or reagent record of one 'reactants>reagents>products' reaction."""
    sides = reaction.strip().split(">")
    if len(sides) != 3:
        raise Reject(chem.BAD_REACTION, f"{len(sides)} parts, expected reactants>reagents>products")
    if task == "reagent" and not sides[1].strip():  # checked first: the chemistry would not change it
        raise Reject(NO_REAGENTS, "empty reagent field")
    reactants, reagents, products = (std.components(s) for s in sides)  # atom maps stripped
    if not reactants or not products:
        raise Reject(chem.BAD_REACTION, "no reactants or no products")
    r, g, p = _texts(reactants), _texts(reagents), _texts(products)
    if task == "forward":  # Mol-Instructions appends the reagents to the reactants
        (in_smi, in_sf), (out_smi, out_sf) = (_join(r, g), p)
    elif task == "retrosynthesis":
        (in_smi, in_sf), (out_smi, out_sf) = (p, r)
    else:
        (in_smi, in_sf), (out_smi, out_sf) = ((f"{r[0]}>>{p[0]}", f"{r[1]}>>{p[1]}"), g)
    meta = _meta(task, source, ident, row, reaction_class=cls, input_smiles=in_smi, output_smiles=out_smi)
    return {"instruction": instruction(task, ident), "input": in_sf, "output": out_sf, "metadata": meta}


def _join(a: tuple[str, str], b: tuple[str, str]) -> tuple[str, str]:
    return tuple(".".join(x for x in pair if x) for pair in zip(a, b))


def property_records(ident: str, smiles: str, values: dict[str, str], std: Standardizer,
                     source: str = "", row: int = -1) -> list[dict]:
    """One record per property; `values` maps property key (homo, lumo, gap) to the source text."""
    numbers = {key: _number(text) for key, text in values.items()}
    for key, value in numbers.items():
        if not math.isfinite(value):
            raise Reject(chem.MALFORMED_ROW, f"{QM9_PROPERTIES[key][0]}={values[key]!r} is not a number")
    # The species whose orbitals were computed: charges kept (no parent / neutralisation), maps stripped.
    smi, sf = _texts([std.component(chem.parse_smiles(smiles))])
    records = []
    for key, value in numbers.items():
        name = QM9_PROPERTIES[key][1]
        out = f"{round(value, 4) + 0.0:.4f}"  # + 0.0: a value that rounds to -0.0 is written 0.0000
        meta = _meta("property", source, ident, row, input_smiles=smi, property=key, unit=QM9_UNIT)
        records.append({"instruction": instruction("property", f"{ident}:{key}", name=name, unit=QM9_UNIT),
                        "input": sf, "output": out, "metadata": meta})
    return records


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


# ------------------------------------------------------------------------------ files -> rows

Rows = Iterator[tuple[int, list[str], str]]  # (row, fields, file name); row counts data rows from 0
Maker = Callable[[int, list[str], str, Standardizer], list[dict]]
Show = Callable[[list[str]], str]  # a rejected row as written to the rejects file


def _csv_rows(path: str, delimiter: str, quoting: int, check: Callable[[list[str]], str | None]):
    """Header (checked now, so a wrong file fails before any work) and a generator of the data rows."""
    if not os.path.isfile(path):
        raise InputError(f"input file not found: {path}")
    f = open(path, newline="", encoding="utf-8", errors="replace")
    reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
    header = next(reader, [])
    problem = check(header)
    if problem:
        f.close()
        raise InputError(f"{path}: {problem}; its header is {header[:8]}")

    def rows():
        with f:
            yield from reader
    return header, rows()


def _reader(task: str, path: str, properties: list[str]) -> tuple[Rows, Maker, Show]:
    """Rows of the input, the function turning one row into records, and how to show a rejected row."""
    name = os.path.basename(path)
    if task == "molcap":
        _, rows = _csv_rows(path, "\t", csv.QUOTE_NONE,  # descriptions hold quote characters
                            lambda h: None if h[:3] == ["CID", "SMILES", "description"]
                            else "a ChEBI-20 file starts with 'CID<TAB>SMILES<TAB>description'")

        def make(row, f, source, std):
            if len(f) != 3:
                raise Reject(chem.MALFORMED_ROW, f"{len(f)} fields, ChEBI-20 has 3 (CID, SMILES, description)")
            return [molcap_record(f[0], f[1], f[2], std, source, row)]
        return ((i, f, name) for i, f in enumerate(rows)), make, "\t".join
    if task in ("forward", "retrosynthesis", "reagent"):
        _, rows = _csv_rows(path, ",", csv.QUOTE_MINIMAL,
                            lambda h: None if len(h) == 3 and h[2].count(">") == 2
                            else "a USPTO file has the header 'id,class,reactants>reagents>production'")

        def make(row, f, source, std):
            if len(f) != 3:
                raise Reject(chem.MALFORMED_ROW, f"{len(f)} fields, USPTO has 3 (id, class, reaction)")
            return [reaction_record(task, f[0], f[1], f[2], std, source, row)]
        return ((i, f, name) for i, f in enumerate(rows)), make, ",".join
    return _qm9_reader(path, properties)


def qm9_folder() -> str:
    spec = importlib.util.find_spec("qm9pack")  # only its data files: its get_data() loads all 130k rows
    if spec is None:
        raise InputError("package qm9pack is not installed; pass --input with QM9 CSV files")
    return os.path.join(spec.submodule_search_locations[0], "data")


def _qm9_reader(path: str, properties: list[str]) -> tuple[Rows, Maker, Show]:
    """QM9 CSV parts (a folder's qm9_part*.csv in order, or one file) as one row stream, rows numbered
    across the parts. Every part's header is checked before the first row is read."""
    files = sorted(glob.glob(os.path.join(path, "qm9_part*.csv"))) if os.path.isdir(path) else [path]
    if not files:
        raise InputError(f"{path}: no qm9_part*.csv files")
    wanted = [QM9_ID, QM9_SMILES] + [QM9_PROPERTIES[p][0] for p in properties]
    parts = [(f, *_csv_rows(f, ",", csv.QUOTE_MINIMAL, lambda h: None if set(wanted) <= set(h)
                            else f"a QM9 file needs the columns {wanted}")) for f in files]
    header = parts[0][1]
    if any(h != header for _, h, _ in parts):
        raise InputError(f"{path}: the QM9 parts have different headers")
    at = {c: header.index(c) for c in wanted}

    def rows() -> Rows:
        row = itertools.count()
        for f, _, part in parts:
            for fields in part:
                yield next(row), fields, os.path.basename(f)

    def make(row, f, source, std):
        if len(f) != len(header):
            raise Reject(chem.MALFORMED_ROW, f"{len(f)} fields, header has {len(header)}")
        values = {p: f[at[QM9_PROPERTIES[p][0]]] for p in properties}
        return property_records(f[at[QM9_ID]].removesuffix(".xyz"), f[at[QM9_SMILES]], values, std, source, row)

    def show(f):  # id, SMILES and values, not the coordinates and frequencies
        return ",".join(f"{c}={f[i]}" for c, i in at.items() if i < len(f))
    return rows(), make, show


# ------------------------------------------------------------------------------ public releases' layouts

# Mol-Instructions (zjunlp/Mol-Instructions, data/Molecule-oriented_Instructions/): one JSON array per task of
# {instruction, input, output, metadata: {task, split}} with SELFIES molecules; property values are numbers.
MOLINST_FILES = {
    "forward": "forward_reaction_prediction.json", "reagent": "reagent_prediction.json",
    "retrosynthesis": "retrosynthesis.json", "design": "description_guided_molecule_design.json",
    "molcap": "molecular_description_generation.json", "property": "property_prediction.json",
}
MOLINST_SPLITS = ("train", "test")


def molinst_record(task: str, rec, source: str = "", row: int = -1) -> dict:
    """A published Mol-Instructions record, its text kept as released (molecules stay the published SELFIES,
    which preprocessing decodes and standardises); the output as text, metadata.task this project's name."""
    if not isinstance(rec, dict):
        raise Reject(chem.MALFORMED_ROW, f"a record is a JSON object, got {type(rec).__name__}")
    from graph.records import MALFORMED_KEY

    if MALFORMED_KEY in rec:  # a line graph.formats could not decode
        raise Reject(chem.MALFORMED_ROW, rec[MALFORMED_KEY])
    for key in ("instruction", "input"):
        if not isinstance(rec.get(key), str):
            raise Reject(chem.MISSING_FIELD, key)
    out = rec.get("output")
    if isinstance(out, (int, float)) and not isinstance(out, bool) and math.isfinite(out):
        out = str(out)
    if not isinstance(out, str) or not out.strip():
        raise Reject(chem.MISSING_FIELD, "output")
    meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
    extra = {k: v for k, v in meta.items() if k not in ("task", "split", "source", "id", "row")}
    return {"instruction": rec["instruction"], "input": rec["input"], "output": out,
            "metadata": _meta(task, source, str(meta.get("id", row)), row, split=meta.get("split"),
                              source_task=meta.get("task"), **extra)}


def molinst_run(task: str, path: str, outputs: dict[str, str], rejects_path: str, limit: int | None = None,
                progress: bool = True) -> dict:
    """One Mol-Instructions task file to one JSONL per metadata.split (outputs: split -> path)."""
    from graph.formats import _json_records, _open

    name = os.path.basename(path)

    def rows() -> Rows:
        with _open(path) as f:
            yield from ((i, rec, name) for i, rec in enumerate(_json_records(f, path)))

    def make(row, rec, source, std):
        return [molinst_record(task, rec, source, row)]

    def show(rec):
        return json.dumps(rec, ensure_ascii=False) if isinstance(rec, dict) else str(rec)
    return convert_rows(task, rows(), make, show, Standardizer(), outputs, rejects_path, limit, progress,
                        split_of=lambda r: r["metadata"]["split"])


# PubChem324k as MolCA's first release laid it out (data_provider/molecule_caption_dataset.py, MoleculeCaption):
# SPLIT/smiles/smiles_CID.txt (one line) and SPLIT/text/text_CID.txt (the description, joined line by line).
# PubChem324kV2's SPLIT.pt files are pickled PyTorch Geometric datasets, which this project does not unpickle.
PUBCHEM_SPLITS = ("pretrain", "train", "valid", "test")


def pubchem_rows(folder: str) -> Rows:
    """(row, [cid, smiles, text], file) per CID of one split folder, in CID order; a CID with only one of
    its two files comes through with an empty field (a reject, not a silent loss)."""
    def cids(sub: str, prefix: str) -> dict[str, str]:
        names = glob.glob(os.path.join(folder, sub, f"{prefix}_*.txt"))
        return {os.path.basename(n)[len(prefix) + 1:-4]: n for n in names}

    if not os.path.isdir(os.path.join(folder, "smiles")) or not os.path.isdir(os.path.join(folder, "text")):
        raise InputError(f"{folder}: a PubChem324k split folder holds smiles/ and text/")
    smiles, texts = cids("smiles", "smiles"), cids("text", "text")

    def read(path: str | None) -> str:
        if path is None:
            return ""
        with open(path, encoding="utf-8", errors="replace") as f:
            return " ".join(line.strip("\n") for line in f).strip()

    def key(cid: str):
        return (0, int(cid), "") if cid.isdigit() else (1, 0, cid)
    for row, cid in enumerate(sorted(set(smiles) | set(texts), key=key)):
        yield row, [cid, read(smiles.get(cid)), read(texts.get(cid))], os.path.basename(folder)


def pubchem_run(folder: str, output: str, limit: int | None = None, progress: bool = True) -> dict:
    """One PubChem324k split folder to molcap records (the same records as ChEBI-20's)."""
    def make(row, f, source, std):
        if not f[1]:
            raise Reject(chem.MISSING_FIELD, "smiles file")
        return [molcap_record(f[0], f[1], f[2], std, source, row)]
    rejects_path = output.removesuffix(".jsonl") + ".rejects.jsonl"
    summary = convert_rows("molcap", pubchem_rows(folder), make, "\t".join, Standardizer(), {"": output},
                           rejects_path, limit, progress)
    return {**summary, "output": output}


# ------------------------------------------------------------------------------ driver


def run(task: str, path: str, output: str, limit: int | None = None, properties: list[str] | None = None,
        progress: bool = True) -> dict:
    if task == "grounding":  # two outputs (training, held out): its own builder decides the split
        raise ValueError("the grounding task writes a training and a held-out file: use trainer.dataset.grounding.build "
                         "(or `python -m trainer.converters grounding`)")
    properties = properties or list(QM9_PROPERTIES)
    rows, make, show = _reader(task, path, properties)
    # QM9 has many molecules under 5 heavy atoms; preprocessing applies its own size filter later
    std = Standardizer(Limits(min_heavy_atoms=1) if task == "property" else Limits())
    rejects_path = (output[:-6] if output.endswith(".jsonl") else output) + ".rejects.jsonl"
    summary = convert_rows(task, rows, make, show, std, {"": output}, rejects_path, limit, progress)
    return {**summary, "output": output}


def convert_rows(task: str, rows: Rows, make: Maker, show: Show, std: Standardizer, outputs: dict[str, str],
                 rejects_path: str, limit: int | None = None, progress: bool = True,
                 split_of: Callable[[dict], str] = lambda rec: "") -> dict:
    """Every row to records in outputs[split_of(record)] or to one line of the rejects file."""
    import contextlib

    from tqdm import tqdm

    reasons: collections.Counter = collections.Counter()
    n_rows = converted = 0
    n_records = collections.Counter()
    bar = tqdm(itertools.islice(rows, limit), total=limit, unit="row", desc=task, file=sys.stderr,
               delay=2, disable=not progress)
    with contextlib.ExitStack() as stack:
        outs = {k: stack.enter_context(atomic_writer(v)) for k, v in outputs.items()}
        rej = stack.enter_context(atomic_writer(rejects_path))
        for row, fields, source in bar:
            n_rows += 1
            try:
                records = make(row, fields, source, std)
                splits = [split_of(rec) for rec in records]
                for split in splits:
                    if split not in outs:
                        raise Reject(chem.MALFORMED_ROW, f"split {split!r}, expected one of {sorted(outs)}")
            except Reject as r:
                reasons[r.reason] += 1
                rej.write(json.dumps({"row": row, "input": show(fields)[:1000], "reason": r.reason,
                                      "detail": r.detail}, ensure_ascii=False) + "\n")
                continue
            converted += 1
            for split, rec in zip(splits, records):
                n_records[split] += 1
                outs[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
    bar.close()
    summary = {"task": task, "input_rows": n_rows, "converted": converted, "rejected": sum(reasons.values()),
               "rejected_by_reason": dict(sorted(reasons.items())), "records": sum(n_records.values()),
               "rejects": rejects_path}
    if len(outputs) > 1:
        summary["records_by_split"] = {k: n_records[k] for k in outputs}
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["grounding"]:  # its own options (sources, held-out split, sampling)
        from .dataset.grounding import main as grounding_main
        return grounding_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m trainer.converters", description=__doc__.split("\n")[0])
    p.add_argument("task", choices=TASKS)
    p.add_argument("--input", default=None, help="source file (property: QM9 folder or CSV, default qm9pack's)")
    p.add_argument("--output", default=None, help="JSONL to write (default runs/instructions/TASK.jsonl)")
    p.add_argument("--limit", type=int, default=None, help="convert only the first N input rows")
    p.add_argument("--properties", default=",".join(QM9_PROPERTIES), help="property task: comma-separated "
                   f"subset of {','.join(QM9_PROPERTIES)}")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    props = [s.strip() for s in a.properties.split(",") if s.strip()]
    if not props or set(props) - set(QM9_PROPERTIES):
        p.error(f"--properties: choose from {','.join(QM9_PROPERTIES)}, got {a.properties!r}")
    if a.limit is not None and a.limit < 0:
        p.error("--limit must be >= 0")
    output = a.output or os.path.join("runs", "instructions", f"{a.task}.jsonl")
    try:
        path = a.input or (qm9_folder() if a.task == "property" else None)
        if path is None:
            raise InputError(f"{a.task} needs --input")
        summary = run(a.task, path, output, a.limit, props, progress=not a.no_progress)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["rejected_by_reason"].get(NO_REAGENTS):
        print(f"note: {summary['rejected_by_reason'][NO_REAGENTS]} rows have an empty reagent field "
              "(USPTO-50K has no reagents); see data/reagent_sample/ for the layout", file=sys.stderr)
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
