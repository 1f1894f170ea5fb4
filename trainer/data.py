"""`python -m trainer.data prepare|overlap`: the public data sets in one command, and the train/test leak check.

    python -m trainer.data prepare chebi20 --source PATH --out DIR      # DIR/chebi20_molcap_{train,...}/, report
    python -m trainer.data overlap --train DIR_OR_FILE... --test DIR_OR_FILE [--drop --out PATH]

prepare: a source (a local copy in the public release's layout, or a Hugging Face dataset repo id) is converted
(trainer.converters), preprocessed on Ray (graph.preprocess), one folder per task and split, and DIR/report.json
(+ report.md) records row counts, rejects and the overlap of every training split with every evaluation split
prepared into DIR (earlier prepares into DIR included, so a PubChem324k pretraining set meets ChEBI-20's test).

overlap: molecules are compared by the InChIKey of the standardised parent (graph.chem, the preprocessing
standardiser, without its size filter); a reaction by its products and its reactant set (reaction components
standardised as preprocessing does, kept whole). A test row overlaps when its molecule occurs in a training set,
a reaction row when a training reaction has the same products and the same reactant set. Every test row counts:
one without a usable molecule is reported as unparseable. The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import collections
import csv
import glob
import json
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Iterator

from rdkit import Chem

from graph import chem
from graph.atomic import atomic_write_json, atomic_write_parquet, atomic_writer
from graph.chem import Limits, Reject, Standardizer
from graph.formats import InputError, Source

NO_INCHIKEY = "no_inchikey"  # RDKit writes no InChI (e.g. '*' attachment points); same code as trainer.dataset.grounding
NO_MOLECULE = "no_molecule"
OVERLAP = "test_overlap"  # reject reason of the rows --drop takes out of a preprocessed folder
TRAIN_SPLITS = ("pretrain", "train")
EVAL_SPLITS = ("validation", "valid", "val", "test")
MOLECULE_IN, MOLECULE_OUT = ("molcap", "property", "grounding"), ("design",)
REACTIONS = ("forward", "retrosynthesis", "reagent")
EXAMPLES = 5  # unparseable rows shown in an overlap result


# ------------------------------------------------------------------------------ keys (pure chemistry)


class Keyer:
    """Row keys: ('m', InChIKey) of a molecule's standardised parent; ('r', products, reactants) of a
    reaction, each a frozenset of component InChIKeys. One per process (holds the standardiser)."""

    def __init__(self):
        self.std = Standardizer(Limits(min_heavy_atoms=1))  # the size filter is not standardisation

    @staticmethod
    def _inchikey(mol) -> str:
        smi = Chem.MolToSmiles(mol)
        key = Chem.MolToInchiKey(chem.parse_smiles(smi))  # fresh parse of the canonical text, as readers see it
        if not key:
            raise Reject(NO_INCHIKEY, smi[:200])
        return key

    def molecule(self, smiles: list[str]) -> tuple:
        if not smiles:
            raise Reject(NO_MOLECULE, "no molecule in the row")
        return ("m", self._inchikey(self.std.parent(".".join(smiles))))

    def reaction(self, reactants: list[str], products: list[str]) -> tuple:
        if not reactants or not products:
            raise Reject(chem.BAD_REACTION, "no reactants or no products")
        side = lambda parts: frozenset(self._inchikey(self.std.component(chem.parse_smiles(p))) for p in parts)
        return ("r", side(products), side(reactants))


def _split(smiles: str) -> list[str]:
    return [p for p in smiles.strip().split(".") if p.strip()]


def molecule_texts(text: str) -> list[str]:
    """SMILES of the molecules in an instruction field: SELFIES ('.'-joined), one SMILES word, or none (prose)."""
    text = text.strip()
    if text.startswith("[") and not any(c.isspace() for c in text):  # SELFIES-shaped, as graph.records reads it
        return [chem.selfies_to_smiles(p) for p in text.split(".") if p]
    if text and not any(c.isspace() for c in text) and Chem.MolFromSmiles(text) is not None:
        return _split(text)
    return []


def task_of(name) -> str | None:
    """This project's task name of a task label (ours, or Mol-Instructions' file and task wording)."""
    if not isinstance(name, str):
        return None
    s = re.sub(r"[^a-z]", "", name.lower())
    for word, task in (("forward", "forward"), ("retro", "retrosynthesis"), ("reagent", "reagent"),
                       ("design", "design"), ("property", "property"), ("grounding", "grounding"),
                       ("molcap", "molcap"), ("caption", "molcap"), ("description", "molcap")):
        if word in s:
            return task
    return None


def instruction_key(k: Keyer, rec, task: str | None = None) -> tuple:
    """Key of one instruction record by its task (metadata.task, else `task`, else the record's shape)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("input"), str):
        raise Reject(chem.MALFORMED_ROW, "not an instruction record")
    meta = rec.get("metadata")
    if isinstance(meta, str):  # shard rows hold metadata as JSON text
        meta = json.loads(meta) if meta.strip().startswith("{") else {}
    meta = meta if isinstance(meta, dict) else {}
    task = task_of(meta.get("task")) or task_of(meta.get("source_task")) or task
    src, out = rec["input"], rec.get("output")
    out = out if isinstance(out, str) else ""
    if task == "reagent" or (task is None and ">>" in src):
        left, _, right = src.partition(">>")
        return k.reaction(molecule_texts(left), molecule_texts(right))
    if task == "forward":
        return k.reaction(molecule_texts(src), molecule_texts(out))
    if task == "retrosynthesis":
        return k.reaction(molecule_texts(out), molecule_texts(src))
    if task in MOLECULE_OUT:
        return k.molecule(molecule_texts(out))
    mols = molecule_texts(src)
    return k.molecule(mols if mols or task in MOLECULE_IN else molecule_texts(out))


# ------------------------------------------------------------------------------ rows of a path


@dataclass
class Rows:
    """The rows of one train or test path: what it is, and per row (row, key or Reject, shown text)."""

    path: str
    kind: str  # "folder" (preprocessed), or the graph.formats format of a raw file
    source: Source | None = None
    manifest: dict | None = None
    rows: list = field(default_factory=list)


def _folder_rows(path: str, k: Keyer, task: str | None) -> Iterator:
    import pyarrow.parquet as pq

    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    fmt = manifest.get("format")
    cols = {"uspto": ["row", "reactants_smiles", "products_smiles"],
            "instructions": ["row", "instruction", "input", "output", "metadata"]}.get(fmt, ["row", "smiles"])
    for shard in manifest["shards"]:
        for r in pq.read_table(os.path.join(path, shard["file"]), columns=cols).to_pylist():
            if fmt == "uspto":
                yield r["row"], lambda r=r: k.reaction(_split(r["reactants_smiles"]), _split(r["products_smiles"])), r
            elif fmt == "instructions":
                yield r["row"], lambda r=r: instruction_key(k, r, task), r
            else:
                yield r["row"], lambda r=r: k.molecule([r["smiles"]]), r


def _raw_key(k: Keyer, src: Source, rec, task: str | None) -> tuple:
    if src.fmt == "smiles":
        return k.molecule(_split(rec[0]))
    if src.fmt == "instructions":
        return instruction_key(k, rec, task)
    if src.fmt == "csv":
        if len(rec) != len(src.context["columns"]):
            raise Reject(chem.MALFORMED_ROW, f"{len(rec)} fields, header has {len(src.context['columns'])}")
        return k.molecule(_split(rec[src.context["smiles_index"]]))
    if len(rec) != 3:
        raise Reject(chem.MALFORMED_ROW, f"{len(rec)} fields, {src.fmt} has 3")
    if src.fmt == "chebi20":
        return k.molecule(_split(rec[1]))
    sides = rec[2].strip().split(">")
    if len(sides) != 3:
        raise Reject(chem.BAD_REACTION, f"{len(sides)} parts, expected reactants>reagents>products")
    return k.reaction(_split(sides[0]), _split(sides[2]))


def read_rows(path: str, k: Keyer, task: str | None = None) -> Rows:
    """Every row of a preprocessed folder (its shards) or a raw file (JSONL/JSON/Parquet instruction records,
    ChEBI-20 TSV, USPTO CSV, CSV with a SMILES column, SMILES list), keyed."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "manifest.json")):
            raise InputError(f"{path}: not a preprocessed folder (no manifest.json); pass a folder or a file")
        out = Rows(path, "folder")
        with open(os.path.join(path, "manifest.json")) as f:
            out.manifest = json.load(f)
        items = _folder_rows(path, k, task)
    else:
        src = Source.open(path)
        if task is None and src.fmt == "instructions":  # a Mol-Instructions file name names its task
            task = task_of(os.path.basename(path))
        out = Rows(path, src.fmt, src)
        items = ((i, lambda rec=rec: _raw_key(k, src, rec, task), rec) for i, rec in enumerate(src.records()))
    for row, key, rec in items:
        try:
            value = key()
        except Reject as r:
            value = r
        except Exception as e:  # an RDKit/SELFIES failure we did not foresee: reported like any unparseable row
            value = Reject("internal_error", repr(e)[:200])
        out.rows.append((row, value, rec))
    return out


# ------------------------------------------------------------------------------ overlap


@dataclass
class Index:
    """What the training sets hold: molecule keys, reactions, and their product and reactant sets."""

    molecules: set = field(default_factory=set)
    reactions: set = field(default_factory=set)
    products: set = field(default_factory=set)
    reactants: set = field(default_factory=set)

    def add(self, key: tuple) -> None:
        if key[0] == "m":
            self.molecules.add(key[1])
        else:
            self.reactions.add(key[1:])
            self.products.add(key[1])
            self.reactants.add(key[2])

    def __contains__(self, key: tuple) -> bool:
        return key[1] in self.molecules if key[0] == "m" else key[1:] in self.reactions


def _shown(rec) -> str:
    if isinstance(rec, dict):
        return json.dumps({k: rec.get(k) for k in ("input", "output", "smiles", "reactants_smiles",
                                                   "products_smiles") if k in rec}, ensure_ascii=False)[:300]
    return "\t".join("" if v is None else str(v) for v in rec)[:300] if isinstance(rec, (list, tuple)) else str(rec)[:300]


def compare(train: list[Rows], test: Rows) -> dict:
    """The overlap figure of one test set against the union of training sets."""
    index = Index()
    train_bad = 0
    for t in train:
        for _, key, _ in t.rows:
            if isinstance(key, Reject):
                train_bad += 1
            else:
                index.add(key)
    hits = prod = reac = bad = n_mol = n_rxn = 0
    reasons: collections.Counter = collections.Counter()
    examples = []
    for row, key, rec in test.rows:
        if isinstance(key, Reject):
            bad += 1
            reasons[key.reason] += 1
            if len(examples) < EXAMPLES:
                examples.append({"row": row, "input": _shown(rec), "reason": key.reason, "detail": key.detail[:200]})
            continue
        hits += key in index
        if key[0] == "m":
            n_mol += 1
        else:
            n_rxn += 1
            prod += key[1] in index.products
            reac += key[2] in index.reactants
    n = len(test.rows)
    out = {"test": test.path, "train": [t.path for t in train], "test_rows": n, "overlapping_rows": hits,
           "overlap_fraction": round(hits / n, 6) if n else 0.0, "unparseable_test_rows": bad,
           "unparseable_by_reason": dict(sorted(reasons.items())), "unparseable_examples": examples,
           "molecule_rows": n_mol, "reaction_rows": n_rxn,
           "train_rows": sum(len(t.rows) for t in train), "unparseable_train_rows": train_bad,
           "key": "InChIKey of the standardised parent; reactions: products + reactant set"}
    if n_rxn:  # the looser readings, for reactions: the product seen, or the reactant set seen
        out.update(product_seen_rows=prod, reactant_set_seen_rows=reac)
    if test.manifest is not None:  # rows preprocessing rejected are not in the test set; said, not hidden
        out["test_rows_rejected_by_preprocessing"] = test.manifest.get("rejected", 0)
    return out


def overlap(train_paths: list[str], test_path: str, task: str | None = None) -> dict:
    """{"test_rows", "overlapping_rows", "overlap_fraction", ...}: how much of the test set occurs in any of
    the training sets (folders or raw files); `task` names instruction records' task when they do not."""
    k = Keyer()
    return compare([read_rows(p, k, task) for p in train_paths], read_rows(test_path, k, task))


def summary_line(result: dict, name: str | None = None) -> str:
    """One line for a report: 'NAME: 12 of 200 test rows (6.0%) occur in the training data ...'."""
    name = name or os.path.basename(os.path.normpath(result["test"]))
    line = (f"{name}: {result['overlapping_rows']} of {result['test_rows']} test rows "
            f"({100 * result['overlap_fraction']:.1f}%) occur in the training data by standardised InChIKey")
    if result.get("reaction_rows"):
        line += (f" (same products and reactant set; product seen: {result['product_seen_rows']}, "
                 f"reactant set seen: {result['reactant_set_seen_rows']})")
    if result["unparseable_test_rows"]:
        line += f"; {result['unparseable_test_rows']} test rows without a usable molecule"
    return line


# ------------------------------------------------------------------------------ --drop


def drop(train: Rows, test: Rows, out: str) -> dict:
    """Write `train` without the rows whose key occurs in `test`, in the input's format where practical:
    a preprocessed folder (dropped rows become `test_overlap` rejects), JSONL/Parquet records, or the
    TSV/CSV/SMILES text. Unparseable training rows are kept (nothing says they leak)."""
    index = Index()
    for _, key, _ in test.rows:
        if not isinstance(key, Reject):
            index.add(key)
    gone = {row for row, key, _ in train.rows if not isinstance(key, Reject) and key in index}
    if os.path.abspath(out) == os.path.abspath(train.path):
        raise InputError("--out must differ from the training input")
    if train.kind == "folder":
        _drop_folder(train, gone, out)
    else:
        _drop_file(train, gone, out)
    return {"out": out, "dropped_rows": len(gone), "kept_rows": len(train.rows) - len(gone)}


def _drop_folder(train: Rows, gone: set, out: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if os.path.exists(os.path.join(out, "manifest.json")):
        raise InputError(f"{out} already holds a preprocessed folder; choose a new --out")
    m = json.loads(json.dumps(train.manifest))
    rejects = []
    if os.path.exists(os.path.join(train.path, "rejects.jsonl")):
        with open(os.path.join(train.path, "rejects.jsonl"), encoding="utf-8") as f:
            rejects = [json.loads(line) for line in f if line.strip()]
    shown = {row: _shown(rec) for row, _, rec in train.rows if row in gone}
    for s in m["shards"]:
        table = pq.read_table(os.path.join(train.path, s["file"]))
        keep = pc.invert(pc.is_in(table.column("row"), value_set=pa.array(sorted(gone), pa.int64())))
        table = table.filter(keep)
        atomic_write_parquet(table, os.path.join(out, s["file"]))
        s["rows"] = table.num_rows
    rejects += [{"row": r, "input": shown[r], "reason": OVERLAP, "detail": "its molecule occurs in the test set"}
                for r in gone]
    with atomic_writer(os.path.join(out, "rejects.jsonl")) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in sorted(rejects, key=lambda r: r["row"]))
    reasons = collections.Counter(m.get("rejected_by_reason", {}))
    if gone:
        reasons[OVERLAP] += len(gone)
    m.update(accepted=m["accepted"] - len(gone), rejected=m["rejected"] + len(gone),
             rejected_by_reason=dict(sorted(reasons.items())), deleaked_from=os.path.abspath(train.path))
    atomic_write_json(m, os.path.join(out, "manifest.json"))


def _drop_file(train: Rows, gone: set, out: str) -> None:
    kept = [rec for row, _, rec in train.rows if row not in gone]
    src = train.source
    if src.fmt == "instructions" and src.path.lower().endswith(".parquet"):
        import pyarrow as pa

        atomic_write_parquet(pa.Table.from_pylist(kept), out)
        return
    with atomic_writer(out) as f:
        if src.fmt == "instructions":  # a JSON array comes out as JSONL: one record per line
            f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in kept)
        elif src.fmt == "smiles":
            f.writelines(" ".join(v for v in rec if v) + "\n" for rec in kept)
        else:
            from graph.formats import _delimiter, _open

            with _open(src.path) as inp:
                header = inp.readline()
            f.write(header if header.endswith("\n") else header + "\n")
            if src.fmt == "chebi20":  # no CSV quoting in ChEBI-20 (descriptions hold quote characters)
                f.writelines("\t".join(rec) + "\n" for rec in kept)
            else:
                csv.writer(f, delimiter=_delimiter(src.path, header), lineterminator="\n").writerows(kept)


# ------------------------------------------------------------------------------ prepare: public layouts

# name -> (default Hugging Face dataset repo, what --source must hold)
SOURCES = {
    "mol-instructions": ("zjunlp/Mol-Instructions", "data/Molecule-oriented_Instructions/*.json "
                         "(or Molecule-oriented_Instructions.zip)"),
    "chebi20": (None, "train.txt, validation.txt, test.txt (MolT5's ChEBI-20 TSV: CID, SMILES, description)"),
    "uspto50k": (None, "raw_train.csv, raw_val.csv (or raw_valid.csv), raw_test.csv "
                 "(id,class,reactants>reagents>production)"),
    "pubchem324k": ("acharkq/PubChem324k", "pretrain/, train/, valid/, test/, each with smiles/smiles_CID.txt "
                    "and text/text_CID.txt (MolCA's PubChem324k layout)"),
}


@dataclass
class Part:
    """One split of one task of a source: where it comes from and the folder it becomes."""

    name: str  # the folder under DIR
    source: str
    task: str
    split: str
    path: str  # file (or PubChem split folder) it is converted from

    @property
    def role(self) -> str:
        return "train" if self.split in TRAIN_SPLITS else "eval"


def fetch(repo_id: str) -> str:
    """A local snapshot of a Hugging Face dataset repo (files only, no loading script run)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=repo_id, repo_type="dataset")
    except Exception as e:  # offline, unknown repo, no network: one line, no traceback
        raise InputError(f"cannot fetch dataset {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); pass --source with a local copy")


def _unzip(zip_path: str, dest: str, suffixes=(".json", ".txt", ".csv")) -> str:
    """Text members of a release zip into DEST (names checked: nothing is written outside it)."""
    root = os.path.abspath(dest)
    with zipfile.ZipFile(zip_path) as z:
        for info in z.infolist():
            target = os.path.abspath(os.path.join(root, info.filename))
            if info.is_dir() or not info.filename.endswith(suffixes) or "__MACOSX" in info.filename:
                continue
            if not target.startswith(root + os.sep):
                raise InputError(f"{zip_path}: member {info.filename!r} points outside the folder")
            if not os.path.exists(target):
                with z.open(info) as src, atomic_writer(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return dest


def _find(root: str, names: list[str], subdirs: list[str]) -> str | None:
    """The first of ROOT and ROOT/SUBDIR... that holds any of `names` (files or folders)."""
    for d in ["", *subdirs]:
        base = os.path.join(root, d)
        if any(os.path.exists(os.path.join(base, n)) for n in names):
            return base
    return None


def parts(name: str, root: str, work: str) -> tuple[list[Part], list[str]]:
    """The splits a local copy holds, and what of the layout is missing (reported, not an error unless all)."""
    if name == "mol-instructions":
        sub = ["data/Molecule-oriented_Instructions", "Molecule-oriented_Instructions"]
        from .converters import MOLINST_FILES

        base = _find(root, list(MOLINST_FILES.values()), sub)
        if base is None:
            zips = glob.glob(os.path.join(root, "**", "Molecule-oriented_Instructions.zip"), recursive=True)
            if zips:
                base = _find(_unzip(zips[0], os.path.join(work, "_source", name)), list(MOLINST_FILES.values()),
                             ["Molecule-oriented_Instructions"])
        if base is None:
            return [], list(MOLINST_FILES.values())
        found = [(t, os.path.join(base, f)) for t, f in MOLINST_FILES.items() if os.path.exists(os.path.join(base, f))]
        missing = [f for t, f in MOLINST_FILES.items() if not os.path.exists(os.path.join(base, f))]
        return [Part(f"molinst_{t}_{s}", name, t, s, p) for t, p in found for s in ("train", "test")], missing
    if name == "chebi20":
        files = {"train": "train.txt", "validation": "validation.txt", "test": "test.txt"}
        base = _find(root, list(files.values()), ["ChEBI-20_data", "data/ChEBI-20_data", "data"]) or root
        have = {s: os.path.join(base, f) for s, f in files.items() if os.path.exists(os.path.join(base, f))}
        return ([Part(f"chebi20_molcap_{s}", name, "molcap", s, p) for s, p in have.items()],
                [f for s, f in files.items() if s not in have])
    if name == "uspto50k":
        files = {"train": ["raw_train.csv"], "valid": ["raw_val.csv", "raw_valid.csv"], "test": ["raw_test.csv"]}
        base = _find(root, [n for v in files.values() for n in v], ["data", "USPTO-50K", "uspto50k"]) or root
        have = {}
        for s, names in files.items():
            hit = [os.path.join(base, n) for n in names if os.path.exists(os.path.join(base, n))]
            if hit:
                have[s] = hit[0]
        return ([Part(f"uspto50k_{t}_{s}", name, t, s, p) for t in ("forward", "retrosynthesis")
                 for s, p in have.items()], [v[0] for s, v in files.items() if s not in have])
    if name == "pubchem324k":
        sub = ["PubChem324k", "data/PubChem324k", "PubChem324kV2"]
        base = _find(root, [f"{s}/smiles" for s in ("pretrain", "train", "valid", "test")], sub)
        if base is None:
            zips = [z for z in glob.glob(os.path.join(root, "**", "*.zip"), recursive=True)]
            for z in zips:
                base = _find(_unzip(z, os.path.join(work, "_source", name)),
                             [f"{s}/smiles" for s in ("pretrain", "train", "valid", "test")], sub)
                if base:
                    break
        if base is None:
            pts = glob.glob(os.path.join(root, "**", "*.pt"), recursive=True)
            if pts:
                raise InputError(f"{root}: PubChem324kV2's .pt files ({os.path.basename(pts[0])}, ...) are pickled "
                                 "PyTorch Geometric datasets and m3mol does not unpickle; give the text layout: "
                                 + SOURCES[name][1])
            return [], ["pretrain/", "train/", "valid/", "test/"]
        from .converters import PUBCHEM_SPLITS

        have = [s for s in PUBCHEM_SPLITS if os.path.isdir(os.path.join(base, s, "smiles"))]
        return ([Part(f"pubchem324k_molcap_{s}", name, "molcap", s, os.path.join(base, s)) for s in have],
                [f"{s}/" for s in PUBCHEM_SPLITS if s not in have])
    raise InputError(f"unknown data set {name!r}; choose one of {', '.join(SOURCES)}")


def _convert(p: Part, out: str, limit: int | None, progress: bool, done: set) -> None:
    """Write OUT/NAME.jsonl (and its rejects and conversion summary) unless it is there from an earlier run."""
    from . import converters
    from .dataset import tasks

    jsonl = os.path.join(out, f"{p.name}.jsonl")
    if os.path.exists(jsonl) or p.path in done:
        return
    if p.source == "mol-instructions":  # one file holds both splits
        prefix = os.path.join(out, f"molinst_{p.task}")
        outputs = {s: f"{prefix}_{s}.jsonl" for s in converters.MOLINST_SPLITS}
        s = converters.molinst_run(p.task, p.path, outputs, f"{prefix}.rejects.jsonl", limit, progress)
        for split, path in outputs.items():  # each split's conversion summary: the shared rejects are on both
            atomic_write_json({**s, "output": path, "records": s["records_by_split"][split]},
                              tasks.conversion_path(out, f"molinst_{p.task}_{split}"))
        done.add(p.path)
        return
    if p.source == "pubchem324k":
        s = converters.pubchem_run(p.path, jsonl, limit, progress)
    else:
        s = converters.run(p.task, p.path, jsonl, limit=limit, progress=progress)
    atomic_write_json(s, tasks.conversion_path(out, p.name))


def prepare(name: str, source: str | None, out: str, limit: int | None = None, progress: bool = False) -> dict:
    """Convert and preprocess every split of a public data set into OUT/, then write OUT/report.json and .md."""
    from .dataset import tasks

    if name not in SOURCES:
        raise InputError(f"unknown data set {name!r}; choose one of {', '.join(SOURCES)}")
    hub, layout = SOURCES[name]
    source = source or hub
    if source is None:
        raise InputError(f"{name}: pass --source (a local copy holding {layout}, or a Hugging Face dataset id)")
    root = source if os.path.exists(source) else fetch(source)
    found, missing = parts(name, root, out)
    if not found:
        raise InputError(f"{source}: no {name} files found; it should hold {layout}")
    os.makedirs(out, exist_ok=True)
    done: set = set()
    with tasks._ray():
        for p in found:
            _convert(p, out, limit, progress, done)
            tasks.preprocess(os.path.join(out, f"{p.name}.jsonl"), os.path.join(out, p.name), progress)
    report = _load_report(out)
    for p in found:
        report["splits"][p.name] = {"source": name, "task": p.task, "split": p.split, "role": p.role,
                                    "from": os.path.abspath(p.path)}
    report["sources"][name] = {"source": source, "local": os.path.abspath(root), "missing": missing, "limit": limit}
    return write_report(out, report)


def _load_report(out: str) -> dict:
    path = os.path.join(out, "report.json")
    report = {"splits": {}, "sources": {}}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        report["splits"] = {k: v for k, v in old.get("splits", {}).items() if os.path.isdir(os.path.join(out, k))}
        report["sources"] = old.get("sources", {})
    return report


def write_report(out: str, report: dict) -> dict:
    """Row counts and rejects per split, and the overlap of every training split with every evaluation split."""
    from .dataset import tasks

    for name, info in report["splits"].items():
        folder = os.path.join(out, name)
        with open(os.path.join(folder, "manifest.json")) as f:
            m = json.load(f)
        info["preprocess"] = {k: m[k] for k in ("input_rows", "accepted", "rejected", "rejected_by_reason")}
        conv = tasks.conversion_path(out, name)
        if os.path.exists(conv):
            with open(conv) as f:
                c = json.load(f)
            info["conversion"] = {k: c[k] for k in ("input_rows", "converted", "rejected", "rejected_by_reason",
                                                    "records") if k in c}
    names = sorted(report["splits"])
    train = [n for n in names if report["splits"][n]["role"] == "train"]
    evals = [n for n in names if report["splits"][n]["role"] == "eval"]
    k = Keyer()
    rows = {n: read_rows(os.path.join(out, n), k) for n in train + evals}
    report["overlap"] = []
    for e in evals:
        for t in train:
            report["overlap"].append({"train": t, "eval": e, **_brief(compare([rows[t]], rows[e]))})
        if len(train) > 1:
            report["overlap"].append({"train": "any", "eval": e, **_brief(compare([rows[t] for t in train], rows[e]))})
    atomic_write_json(report, os.path.join(out, "report.json"))
    with atomic_writer(os.path.join(out, "report.md")) as f:
        f.write(report_markdown(report))
    return report


def _brief(r: dict) -> dict:
    keep = ("test_rows", "overlapping_rows", "overlap_fraction", "unparseable_test_rows", "product_seen_rows",
            "reactant_set_seen_rows")
    return {k: r[k] for k in keep if k in r}


def report_markdown(report: dict) -> str:
    lines = ["# Prepared data", "", "| folder | task | split | input rows | converted | preprocessed | rejected |",
             "|---|---|---|---|---|---|---|"]
    for n, s in sorted(report["splits"].items()):
        c, p = s.get("conversion", {}), s["preprocess"]
        rej = collections.Counter(c.get("rejected_by_reason", {})) + collections.Counter(p["rejected_by_reason"])
        lines.append(f"| {n} | {s['task']} | {s['split']} | {c.get('input_rows', '?')} | {c.get('records', '?')} | "
                     f"{p['accepted']} | {', '.join(f'{k} {v}' for k, v in sorted(rej.items())) or '0'} |")
    lines += ["", "## Train/test overlap (standardised InChIKey; reactions: products + reactant set)", "",
              "| train | eval | eval rows | overlapping | fraction | unparseable |", "|---|---|---|---|---|---|"]
    for o in report["overlap"]:
        lines.append(f"| {o['train']} | {o['eval']} | {o['test_rows']} | {o['overlapping_rows']} | "
                     f"{100 * o['overlap_fraction']:.1f}% | {o['unparseable_test_rows']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="convert + preprocess a public data set, with a report")
    pp.add_argument("name", choices=list(SOURCES))
    pp.add_argument("--source", default=None, help="local copy in the release's layout, or a Hugging Face dataset "
                    "id (default: " + ", ".join(f"{k}: {v[0]}" for k, v in SOURCES.items() if v[0]) + ")")
    pp.add_argument("--out", required=True, help="folder for the preprocessed splits and report.json")
    pp.add_argument("--limit", type=int, default=None, help="convert only the first N rows of each file")
    pp.add_argument("--no-progress", action="store_true")
    po = sub.add_parser("overlap", help="train/test overlap by standardised InChIKey")
    po.add_argument("--train", nargs="+", required=True, help="preprocessed folders or raw files")
    po.add_argument("--test", required=True, help="a preprocessed folder or raw file")
    po.add_argument("--task", default=None, help="task of instruction records whose metadata names none")
    po.add_argument("--drop", action="store_true", help="write the training set without the overlapping rows")
    po.add_argument("--out", default=None, help="with --drop: the de-leaked training set (file or folder)")
    a = p.parse_args(argv)
    try:
        if a.command == "prepare":
            if a.limit is not None and a.limit < 0:
                p.error("--limit must be >= 0")
            r = prepare(a.name, a.source, a.out, a.limit, progress=not a.no_progress)
            for o in r["overlap"]:
                print(f"{o['train']} -> {o['eval']}: {o['overlapping_rows']}/{o['test_rows']}", file=sys.stderr)
            print(json.dumps({"out": a.out, "splits": {n: s["preprocess"]["accepted"] for n, s in r["splits"].items()},
                              "overlap": r["overlap"]}))
            return 0
        if a.drop and (not a.out or len(a.train) != 1):
            p.error("--drop needs --out PATH and exactly one --train")
        if a.task is not None and a.task not in (*MOLECULE_IN, *MOLECULE_OUT, *REACTIONS):
            p.error(f"--task: one of {', '.join((*MOLECULE_IN, *MOLECULE_OUT, *REACTIONS))}")
        k = Keyer()
        train = [read_rows(t, k, a.task) for t in a.train]
        test = read_rows(a.test, k, a.task)
        result = compare(train, test)
        if a.drop:
            result["drop"] = drop(train[0], test, a.out)
        print(summary_line(result), file=sys.stderr)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
