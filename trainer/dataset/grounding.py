"""Grounding probe data: questions whose answers are read off the input molecule's structure, RDKit as
ground truth (issue 11).

    python -m trainer.converters grounding --input data/chebi20/train.txt --input data/chebi20/test.txt \
        --output runs/instructions/grounding.jsonl        # held out: runs/instructions/grounding_test.jsonl

Question types: `has_<group>` (yes/no, a curated set of functional groups and motifs as SMARTS),
`count_rings`, `count_aromatic_rings`, `count_brics_motifs` and `count_heavy_atoms` (the two last from the
project's own hierarchical graph, `graph.hierarchy.mol_to_graph`), and `property_logp` (Crippen logP).
Records follow the Mol-Instructions schema of `trainer.converters` (input: SELFIES of the standardised
parent's canonical SMILES). Every molecule gets one question of each count type and the property, and up
to `questions_per_molecule` yes/no questions; per group equally many positive and negative molecules are
asked (seeded). Held-out molecules are chosen by a hash of the InChIKey, so the split is the same on every
run and every source, and no InChIKey (nor stereoisomer) is on both sides.
"""
from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import random
import sys
import zlib
from dataclasses import dataclass

from rdkit import Chem
from rdkit.Chem import Crippen, rdMolDescriptors

from graph import chem
from graph.atomic import atomic_writer
from graph.chem import Reject, Standardizer
from graph.formats import InputError, Source
from graph.hierarchy import mol_to_graph

TASK = "grounding"
SPLITS = ("train", "test")
NO_INCHIKEY = "no_inchikey"  # reject reason: RDKit writes no InChI (e.g. ChEBI's '*' attachment points)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_SOURCES = (os.path.join(ROOT, "data", "chebi20", "train.txt"), os.path.join(ROOT, "data", "chebi20", "test.txt"))

# (name, how a question names it, SMARTS). Written for standardised parents (neutralised, explicit
# aromaticity); a group is present when its SMARTS matches at least once.
GROUPS = (
    ("carboxylic_acid", "a carboxylic acid group", "[CX3](=O)[OX2H1,OX1-]"),
    ("ester", "an ester group", "[#6][CX3](=O)[OX2H0][#6]"),
    ("amide", "an amide group", "[CX3](=[OX1])[NX3]"),
    # N with two H on carbon, not an amide, thioamide, amidine or sulfonamide nitrogen
    ("primary_amine", "a primary amine group", "[NX3;H2;!$(N[#6]=[O,S,N]);!$(N[S,P]=O)][#6]"),
    ("alcohol", "an alcohol (aliphatic hydroxyl) group", "[OX2H][CX4]"),
    ("phenol", "a phenolic hydroxyl group", "[OX2H]c"),
    ("ketone", "a ketone group", "[#6][CX3](=O)[#6]"),
    ("aldehyde", "an aldehyde group", "[CX3H1](=O)[#6]"),
    ("nitro", "a nitro group", "[#6][$([NX3+](=O)[O-]),$([NX3](=O)=O)]"),
    ("nitrile", "a nitrile group", "[NX1]#[CX2][#6]"),
    ("halogen", "a halogen atom (F, Cl, Br or I)", "[F,Cl,Br,I]"),
    # C-O-C that is not part of an ester or acid (acetals and ring ethers count; aromatic O does not)
    ("ether", "an ether linkage", "[OX2;!a;!$(O[#6]=[O,S,N])]([#6])[#6]"),
    ("benzene_ring", "a benzene ring", "c1ccccc1"),
    ("alkene", "a non-aromatic carbon-carbon double bond", "[CX3;!a]=[CX3;!a]"),
    ("phosphate", "a phosphate group", "[PX4](=O)([OX2,OX1-])([OX2,OX1-])[OX2,OX1-]"),
    ("sulfonamide", "a sulfonamide group", "[SX4](=O)(=O)[NX3]"),
)
GROUP_NAMES = tuple(g[0] for g in GROUPS)
_PATTERNS = {name: Chem.MolFromSmarts(smarts) for name, _, smarts in GROUPS}
YESNO_TYPES = tuple(f"has_{g}" for g in GROUP_NAMES)
COUNT_TYPES = ("count_rings", "count_aromatic_rings", "count_brics_motifs", "count_heavy_atoms")
NUMBER_TYPES = ("property_logp",)
QUESTION_TYPES = YESNO_TYPES + COUNT_TYPES + NUMBER_TYPES
ORDER = {qt: i for i, qt in enumerate(QUESTION_TYPES)}


def answer_kind(question_type: str) -> str:
    return "yesno" if question_type in YESNO_TYPES else "count" if question_type in COUNT_TYPES else "number"


# Our own phrasings; one is picked per (molecule, question type), stable across reruns.
YESNO_PHRASES = (
    "Does this molecule contain {group}? Answer yes or no.",
    "Is there {group} in the molecule below? Answer yes or no.",
    "Answer yes or no: does the following molecule have {group}?",
)
PHRASES = {
    "count_rings": ("How many rings does this molecule have? Answer with a number.",
                    "Count the rings (smallest set of smallest rings) in the molecule below. Answer with a number."),
    "count_aromatic_rings": ("How many aromatic rings does this molecule have? Answer with a number.",
                             "Count the aromatic rings in the following molecule. Answer with a number."),
    "count_brics_motifs": ("Into how many fragments do the BRICS rules cut this molecule? Answer with a number.",
                           "How many BRICS motifs does the molecule below consist of? Answer with a number."),
    "count_heavy_atoms": ("How many heavy (non-hydrogen) atoms does this molecule have? Answer with a number.",
                          "Count the non-hydrogen atoms of the following molecule. Answer with a number."),
    "property_logp": ("What is the Crippen logP of this molecule? Give the value with two decimals.",
                      "Estimate the octanol-water partition coefficient (Crippen logP) of the molecule below, "
                      "with two decimals."),
}


def instruction(question_type: str, key: str) -> str:
    """One phrasing per (question type, molecule), chosen like trainer.converters.instruction."""
    if question_type in YESNO_TYPES:
        group = dict((g[0], g[1]) for g in GROUPS)[question_type[4:]]
        options = [p.format(group=group) for p in YESNO_PHRASES]
    else:
        options = PHRASES[question_type]
    return options[zlib.crc32(f"{TASK}:{question_type}:{key}".encode()) % len(options)]


# ------------------------------------------------------------------------------ molecule -> answers


def groups_present(mol: Chem.Mol) -> dict[str, bool]:
    return {name: mol.HasSubstructMatch(_PATTERNS[name]) for name in GROUP_NAMES}


def logp_text(value: float) -> str:
    return f"{round(value, 2) + 0.0:.2f}"  # + 0.0: a value rounding to -0.0 is written 0.00


def answers(mol: Chem.Mol) -> dict[str, str]:
    """Pure function: every question type's answer text for one (standardised) molecule.

    Crippen logP is the numeric property: atom-additive, so it is a function of the 2-D structure the
    model reads (no conformer, no randomness), exactly reproducible by RDKit, and spread widely over
    ChEBI-20 (about -10 to +20), unlike formula-level properties (weight) a model could add up by rote.
    """
    graph = mol_to_graph(mol)  # the counts the model's own graph tokens carry
    out = {f"has_{g}": "Yes" if present else "No" for g, present in groups_present(mol).items()}
    out.update(count_rings=str(rdMolDescriptors.CalcNumRings(mol)),
               count_aromatic_rings=str(rdMolDescriptors.CalcNumAromaticRings(mol)),
               count_brics_motifs=str(graph.num_motifs), count_heavy_atoms=str(graph.num_atoms),
               property_logp=logp_text(Crippen.MolLogP(mol)))
    return out


def split_of(inchikey: str, held_out_fraction: float) -> str:
    """'test' for a fixed share of molecules, decided by the InChIKey's first block (the connectivity):
    stereoisomers have the same answers to every question here, so they stay on one side too."""
    h = int.from_bytes(hashlib.sha256(inchikey[:14].encode()).digest()[:8], "big") / 2.0**64
    return "test" if h < held_out_fraction else "train"


@dataclass
class Molecule:
    smiles: str  # canonical SMILES of the standardised parent
    selfies: str
    inchikey: str
    source: str
    row: int
    answers: dict


def molecule(smiles: str, std: Standardizer, source: str = "", row: int = -1) -> Molecule:
    """One source SMILES to its standardised parent with all answers, or a Reject."""
    from ..converters import _texts

    smi, sf = _texts([std.parent(smiles)])
    mol = chem.parse_smiles(smi)  # the molecule as the record's reader sees it (fresh parse of the text)
    key = Chem.MolToInchiKey(mol)
    if not key:
        raise Reject(NO_INCHIKEY, smi[:200])
    return Molecule(smi, sf, key, source, row, answers(mol))


# ------------------------------------------------------------------------------ sources -> molecules


def resolve(path: str) -> list[str]:
    """Input files of one --input: a file, a folder (its CSV/SMILES/TSV files, sorted), or the
    installed data sets 'qm9' (qm9pack's parts) and 'moses' / 'moses_test' (molsets' CSVs)."""
    if path == "qm9":
        from ..converters import qm9_folder

        return sorted(glob.glob(os.path.join(qm9_folder(), "qm9_part*.csv")))  # the folder holds other tables too
    if path in ("moses", "moses_test"):
        spec = importlib.util.find_spec("moses")  # its data files only: importing moses pulls in torch extras
        if spec is None:
            raise InputError("package molsets is not installed (pip install --no-deps molsets==0.3.1)")
        return [os.path.join(spec.submodule_search_locations[0], "dataset", "data",
                             "train.csv.gz" if path == "moses" else "test.csv.gz")]
    if os.path.isdir(path):
        files = sorted(f for ext in ("csv", "csv.gz", "smi", "tsv", "txt") for f in glob.glob(os.path.join(path, f"*.{ext}")))
        if not files:
            raise InputError(f"{path}: no .csv, .csv.gz, .smi, .tsv or .txt files")
        return files
    return [path]


def _rows(path: str):
    """(row, SMILES or a Reject, shown row) per data row of a ChEBI-20 TSV, a CSV with a SMILES column or
    a SMILES list; graph.formats reads and checks the layout."""
    src = Source.open(path)
    if src.fmt not in ("chebi20", "csv", "smiles"):
        raise InputError(f"{path}: grounding reads ChEBI-20 TSV, CSV with a SMILES column or SMILES lists, not {src.fmt}")
    for row, rec in enumerate(src.records()):
        if src.fmt == "smiles":
            yield row, rec[0], " ".join(v for v in rec if v)
            continue
        shown = ("\t" if src.fmt == "chebi20" else ",").join(rec)
        if src.fmt == "chebi20":
            smiles = rec[1] if len(rec) == 3 else Reject(chem.MALFORMED_ROW, f"{len(rec)} fields, ChEBI-20 has 3")
        else:
            n = len(src.context["columns"])
            smiles = rec[src.context["smiles_index"]] if len(rec) == n else \
                Reject(chem.MALFORMED_ROW, f"{len(rec)} fields, header has {n}")
        yield row, smiles, shown


def read_molecules(sources: list[str], limit: int | None, rejects, progress: bool = False):
    """Unique molecules of the sources in input order (the first row of each InChIKey), the number of
    rows whose molecule came earlier, and the reject reasons; rejected rows are written to `rejects`."""
    from tqdm import tqdm

    files = [f for s in sources for f in resolve(s)]
    for f in files:  # every file's layout checked before any work
        Source.open(f)
    std = Standardizer()
    rows = ((os.path.basename(f), *r) for f in files for r in _rows(f))
    seen: dict[str, Molecule] = {}
    reasons: collections.Counter = collections.Counter()
    n_rows = duplicates = 0
    for source, row, smiles, shown in tqdm(itertools.islice(rows, limit), total=limit, unit="row", desc=TASK,
                                           file=sys.stderr, delay=2, disable=not progress):
        n_rows += 1
        try:
            if isinstance(smiles, Reject):
                raise smiles
            m = molecule(smiles, std, source, row)
        except Exception as e:  # an RDKit failure nobody foresaw is recorded like graph.records does, not fatal
            r = e if isinstance(e, Reject) else Reject("internal_error", repr(e)[:300])
            reasons[r.reason] += 1
            rejects.write(json.dumps({"source": source, "row": row, "input": shown[:1000], "reason": r.reason,
                                      "detail": r.detail}, ensure_ascii=False) + "\n")
            continue
        if m.inchikey in seen:
            duplicates += 1
        else:
            seen[m.inchikey] = m
    return list(seen.values()), n_rows, duplicates, reasons


# ------------------------------------------------------------------------------ molecules -> questions


def select(mols: list[Molecule], groups: list[str], per_molecule: int, seed: int, split: str,
           max_per_group: int | None = None) -> list[tuple[int, str]]:
    """(molecule index, question type) pairs of one split, in molecule then question-type order.

    Yes/no: round robin over the groups, each turn one positive and one negative molecule of the group
    (seeded shuffles), each molecule asked at most `per_molecule` yes/no questions; a group stops when it
    runs out of either, so every group is exactly balanced and rare groups are not crowded out by common
    ones. Every molecule also gets each count question and the property question.
    """
    load = [0] * len(mols)
    queues = {}
    for g in groups:
        order = list(range(len(mols)))
        random.Random(f"{seed}:{split}:{g}").shuffle(order)
        yes = [i for i in order if mols[i].answers[f"has_{g}"] == "Yes"]
        no = [i for i in order if mols[i].answers[f"has_{g}"] == "No"]
        queues[g] = [iter(yes), iter(no), 0]
    picks = []
    active = [g for g in groups if max_per_group != 0]
    while active:
        still = []
        for g in active:
            q = queues[g]
            pos = next((i for i in q[0] if load[i] < per_molecule), None)
            neg = next((i for i in q[1] if load[i] < per_molecule), None) if pos is not None else None
            if pos is None or neg is None:
                continue
            for i in (pos, neg):
                load[i] += 1
                picks.append((i, f"has_{g}"))
            q[2] += 1
            if max_per_group is None or q[2] < max_per_group:
                still.append(g)
        active = still
    picks += [(i, qt) for i in range(len(mols)) for qt in COUNT_TYPES + NUMBER_TYPES]
    return sorted(picks, key=lambda p: (p[0], ORDER[p[1]]))


def record(m: Molecule, question_type: str, split: str) -> dict:
    meta = {"task": TASK, "question_type": question_type, "answer_kind": answer_kind(question_type),
            "smiles": m.smiles, "inchikey": m.inchikey, "source": m.source, "row": m.row, "split": split}
    return {"instruction": instruction(question_type, m.inchikey), "input": m.selfies,
            "output": m.answers[question_type], "metadata": meta}


# ------------------------------------------------------------------------------ driver


def rejects_path(output: str) -> str:
    return (output[:-6] if output.endswith(".jsonl") else output) + ".rejects.jsonl"


def build(sources: list[str] | None, out_train: str, out_test: str | None = None, held_out_fraction: float = 0.2,
          questions_per_molecule: int = 4, seed: int = 0, limit: int | None = None, min_positives: int = 10,
          max_per_group: int | None = None, progress: bool = False) -> dict:
    """Write the training and held-out JSONL (and OUT_TRAIN.rejects.jsonl); return the summary.

    `sources`: paths (see `resolve`), default the shipped ChEBI-20 train and test files. A group with
    fewer than `min_positives` positive molecules (both splits together) is skipped and reported."""
    if not 0.0 <= held_out_fraction <= 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1], got {held_out_fraction}")
    if questions_per_molecule < 0 or min_positives < 0 or (max_per_group is not None and max_per_group < 0):
        raise ValueError("questions_per_molecule, min_positives and max_per_group must be >= 0")
    sources = list(sources or DEFAULT_SOURCES)
    out_test = out_test or (out_train[:-6] if out_train.endswith(".jsonl") else out_train) + "_test.jsonl"
    if os.path.abspath(out_test) == os.path.abspath(out_train):
        raise ValueError("the held-out output must differ from the training output")
    rej_path = rejects_path(out_train)
    with atomic_writer(rej_path) as rej:
        mols, n_rows, duplicates, reasons = read_molecules(sources, limit, rej, progress)
    positives = {g: sum(m.answers[f"has_{g}"] == "Yes" for m in mols) for g in GROUP_NAMES}
    groups = [g for g in GROUP_NAMES if positives[g] >= max(min_positives, 1)]
    by_split = {s: [m for m in mols if split_of(m.inchikey, held_out_fraction) == s] for s in SPLITS}
    per_type = {qt: dict.fromkeys(SPLITS, 0) for qt in QUESTION_TYPES}
    yes = {qt: dict.fromkeys(SPLITS, 0) for qt in YESNO_TYPES}
    for split, path in zip(SPLITS, (out_train, out_test)):
        split_mols = by_split[split]
        with atomic_writer(path) as out:
            for i, qt in select(split_mols, groups, questions_per_molecule, seed, split, max_per_group):
                rec = record(split_mols[i], qt, split)
                per_type[qt][split] += 1
                if qt in yes:
                    yes[qt][split] += rec["output"] == "Yes"
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return {
        "task": TASK, "input_rows": n_rows, "molecules": len(mols), "duplicates": duplicates,
        "rejected": sum(reasons.values()), "rejected_by_reason": dict(sorted(reasons.items())),
        "molecules_by_split": {s: len(by_split[s]) for s in SPLITS},
        "records": {s: sum(per_type[qt][s] for qt in QUESTION_TYPES) for s in SPLITS},
        "by_question_type": {qt: v for qt, v in per_type.items() if any(v.values())},
        "yes_share": {qt: {s: round(yes[qt][s] / per_type[qt][s], 4) if per_type[qt][s] else None for s in SPLITS}
                      for qt in YESNO_TYPES if qt[4:] in groups},
        "prevalence": {g: round(positives[g] / len(mols), 4) if mols else None for g in GROUP_NAMES},
        "skipped_groups": {g: positives[g] for g in GROUP_NAMES if g not in groups},
        "held_out_fraction": held_out_fraction, "seed": seed, "output": out_train, "held_out": out_test,
        "rejects": rej_path,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.converters grounding", description=__doc__.split("\n")[0])
    p.add_argument("--input", action="append", default=None,
                   help="source (repeatable): ChEBI-20 TSV, CSV with a SMILES column (.gz too), SMILES list, a folder "
                        "of them, 'qm9' or 'moses'/'moses_test'; default data/chebi20/train.txt and test.txt")
    p.add_argument("--output", default=os.path.join("runs", "instructions", "grounding.jsonl"),
                   help="training JSONL (rejects: OUT.rejects.jsonl)")
    p.add_argument("--held-out", default=None, help="held-out JSONL (default OUT_test.jsonl)")
    p.add_argument("--held-out-fraction", type=float, default=0.2)
    p.add_argument("--questions-per-molecule", type=int, default=4, help="yes/no questions per molecule at most")
    p.add_argument("--seed", type=int, default=0, help="sampling of the yes/no questions (the split is not seeded)")
    p.add_argument("--limit", type=int, default=None, help="read only the first N input rows (all sources)")
    p.add_argument("--min-positives", type=int, default=10, help="skip a group with fewer positive molecules")
    p.add_argument("--max-per-group", type=int, default=None, help="positive (= negative) questions per group and split at most")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 0:
        p.error("--limit must be >= 0")
    try:
        summary = build(a.input, a.output, a.held_out, a.held_out_fraction, a.questions_per_molecule, a.seed,
                        a.limit, a.min_positives, a.max_per_group, progress=not a.no_progress)
    except ValueError as e:  # InputError is a ValueError: a missing file, a wrong layout, a bad option
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["skipped_groups"]:
        print(f"note: groups with fewer than {a.min_positives} positive molecules skipped: "
              + ", ".join(f"{g} ({n})" for g, n in summary["skipped_groups"].items()), file=sys.stderr)
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
