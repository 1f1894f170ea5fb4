"""Worker side of preprocessing: raw input records to shard rows (or rejects), a chunk at a time.

A shard row holds scalar columns (row, ids, text) and one or more *molecule blocks*. A block is the
ordered list of molecules of one role (the molecule of a molecule row, a reaction side, the input
molecules of an instruction), stored under a column prefix:

  {p}smiles, {p}selfies          canonical, '.'-joined over the block's molecules
  {p}num_atoms/bonds/motifs      totals over the block
  {p}mol_num_atoms/bonds/motifs  per molecule (list), to split the block into molecules
  {p}atom_x                      flat uint8, 9 features per atom  (graph.features.ATOM_FEATURES)
  {p}bonds                       flat int32, (begin, end) per bond, atom indices local to the molecule
  {p}bond_x                      flat uint8, 3 features per bond  (graph.features.BOND_FEATURES)
  {p}atom_motif                  flat int32, BRICS motif id per atom, local to the molecule
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from . import chem
from .chem import Reject, Standardizer
from .hierarchy import graph_lists

REACTION_SIDES = ("reactants", "reagents", "products")
MALFORMED_KEY = "__malformed__"  # the driver's stand-in for an undecodable JSON line

# Scalar columns and molecule-block prefixes of each input format's shard rows.
SCALARS = {
    "smiles": {"row": pa.int64(), "id": pa.string()},
    "csv": {"row": pa.int64(), "extra": pa.string()},
    "chebi20": {"row": pa.int64(), "id": pa.string(), "text": pa.string()},
    "uspto": {"row": pa.int64(), "id": pa.string(), "reaction_class": pa.string(), "reaction": pa.string()},
    "instructions": {
        "row": pa.int64(), "instruction": pa.string(), "input": pa.string(), "output": pa.string(),
        "metadata": pa.string(), "output_smiles": pa.string(),
    },
}
BLOCKS = {"uspto": tuple(f"{s}_" for s in REACTION_SIDES)}  # every other format: one block, prefix ""

_BLOCK_COUNTS = ("num_atoms", "num_bonds", "num_motifs")
_BLOCK_LISTS = {  # name -> (arrow value type, numpy dtype)
    "mol_num_atoms": (pa.int32(), np.int32), "mol_num_bonds": (pa.int32(), np.int32),
    "mol_num_motifs": (pa.int32(), np.int32), "atom_x": (pa.uint8(), np.uint8),
    "bonds": (pa.int32(), np.int32), "bond_x": (pa.uint8(), np.uint8), "atom_motif": (pa.int32(), np.int32),
}


def block_prefixes(fmt: str) -> tuple[str, ...]:
    return BLOCKS.get(fmt, ("",))


def schema(fmt: str) -> pa.Schema:
    fields = [pa.field(k, t) for k, t in SCALARS[fmt].items()]
    for p in block_prefixes(fmt):
        fields += [pa.field(p + "smiles", pa.string()), pa.field(p + "selfies", pa.string())]
        fields += [pa.field(p + c, pa.int32()) for c in _BLOCK_COUNTS]
        fields += [pa.field(p + c, pa.list_(t)) for c, (t, _) in _BLOCK_LISTS.items()]
    return pa.schema(fields)


@dataclass
class EncodedMol:
    smiles: str
    selfies: str
    atom_x: list
    bonds: list
    bond_x: list
    atom_motif: list
    num_motifs: int


def encode(mol) -> EncodedMol:
    """Canonical SMILES, SELFIES and hierarchical graph of one standardised molecule."""
    smiles, atom_x, bonds, bond_x, motif, m = graph_lists(mol)
    if "@" in smiles or "/" in smiles or "\\" in smiles:
        # RDKit's canonical SMILES is not idempotent for some ring stereo (trans-1,4-cyclohexanes read from
        # atom-mapped USPTO text: 33 of 5,001 products): re-read once so the stored SMILES, the SELFIES and
        # any later fresh parse (evaluation) agree.
        again = chem.parse_smiles(smiles)
        if chem.Chem.MolToSmiles(again) != smiles:
            smiles, atom_x, bonds, bond_x, motif, m = graph_lists(again)
    return EncodedMol(smiles, chem.to_selfies(smiles), atom_x, bonds, bond_x, motif, m)


class ChunkBuilder:
    """Accumulates accepted rows of one chunk column-wise; `table()` builds the Arrow table at once."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.scalars = {k: [] for k in SCALARS[fmt]}
        self.blocks = {p: {c: [] for c in ("smiles", "selfies", *_BLOCK_COUNTS)} for p in block_prefixes(fmt)}
        # flat values and per-row lengths of each list column
        self.lists = {p: {c: ([], []) for c in _BLOCK_LISTS} for p in block_prefixes(fmt)}

    def add(self, scalars: dict, blocks: dict[str, list[EncodedMol]]) -> None:
        for k, col in self.scalars.items():
            col.append(scalars.get(k))
        for p, mols in blocks.items():
            b, lists = self.blocks[p], self.lists[p]
            b["smiles"].append(".".join(m.smiles for m in mols))
            b["selfies"].append(".".join(m.selfies for m in mols))
            n_atoms = [len(m.atom_motif) for m in mols]
            n_bonds = [len(m.bond_x) // 3 for m in mols]
            n_motifs = [m.num_motifs for m in mols]
            b["num_atoms"].append(sum(n_atoms))
            b["num_bonds"].append(sum(n_bonds))
            b["num_motifs"].append(sum(n_motifs))
            for name, values in (("mol_num_atoms", n_atoms), ("mol_num_bonds", n_bonds), ("mol_num_motifs", n_motifs)):
                lists[name][0].extend(values)
                lists[name][1].append(len(values))
            for name in ("atom_x", "bonds", "bond_x", "atom_motif"):
                flat, lengths = lists[name]
                start = len(flat)
                for m in mols:
                    flat.extend(getattr(m, name))
                lengths.append(len(flat) - start)

    def __len__(self) -> int:
        return len(self.scalars["row"])

    def table(self) -> pa.Table:
        sch = schema(self.fmt)
        arrays = [pa.array(self.scalars[k], type=t) for k, t in SCALARS[self.fmt].items()]
        for p in block_prefixes(self.fmt):
            arrays += [pa.array(self.blocks[p][c], type=sch.field(p + c).type) for c in ("smiles", "selfies", *_BLOCK_COUNTS)]
            for name, (_, dtype) in _BLOCK_LISTS.items():
                flat, lengths = self.lists[p][name]
                offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
                np.cumsum(lengths, out=offsets[1:])
                arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(flat, dtype=dtype))))
        return pa.Table.from_arrays(arrays, schema=sch)


# ----------------------------------------------------------------------------------------- formats


def _looks_like_selfies(text: str) -> bool:
    """SELFIES-shaped: bracketed tokens, no spaces. A broken one is then a reject, not prose."""
    return text.startswith("[") and not any(c.isspace() for c in text)


class RowProcessor:
    """Turns one raw record of a format into (scalars, blocks), raising `Reject`. One per worker."""

    def __init__(self, fmt: str, context: dict, limits: chem.Limits):
        self.fmt = fmt
        self.context = context  # format details the driver read from the header (column positions)
        self.std = Standardizer(limits)
        self.process = getattr(self, "_" + fmt)

    def _parent(self, smiles: str) -> list[EncodedMol]:
        return [encode(self.std.parent(smiles))]

    def _smiles(self, rec):
        smiles, ident = rec
        return {"id": ident}, {"": self._parent(smiles)}

    def _csv(self, fields):
        columns, i = self.context["columns"], self.context["smiles_index"]
        if len(fields) != len(columns):
            raise Reject(chem.MALFORMED_ROW, f"{len(fields)} fields, header has {len(columns)}")
        smiles = fields[i]
        extra = {c: v for j, (c, v) in enumerate(zip(columns, fields)) if j != i}
        return {"extra": json.dumps(extra, ensure_ascii=False)}, {"": self._parent(smiles)}

    def _chebi20(self, fields):
        if len(fields) != 3:
            raise Reject(chem.MALFORMED_ROW, f"{len(fields)} fields, ChEBI-20 has 3 (CID, SMILES, description)")
        cid, smiles, text = fields
        if not text.strip():
            raise Reject(chem.MISSING_FIELD, "description")
        return {"id": cid, "text": text}, {"": self._parent(smiles)}

    def _uspto(self, fields):
        if len(fields) != 3:
            raise Reject(chem.MALFORMED_ROW, f"{len(fields)} fields, USPTO has 3 (id, class, reaction)")
        ident, cls, rxn = fields
        sides = rxn.strip().split(">")
        if len(sides) != 3:
            raise Reject(chem.BAD_REACTION, f"{len(sides)} parts, expected reactants>reagents>products")
        blocks = {f"{name}_": [encode(m) for m in self.std.components(s)] for name, s in zip(REACTION_SIDES, sides)}
        if not blocks["reactants_"] or not blocks["products_"]:
            raise Reject(chem.BAD_REACTION, "no reactants or no products")
        reaction = ">".join(".".join(m.smiles for m in blocks[f"{s}_"]) for s in REACTION_SIDES)
        return {"id": ident, "reaction_class": cls, "reaction": reaction}, blocks

    def _instructions(self, rec):
        if not isinstance(rec, dict):
            raise Reject(chem.MALFORMED_ROW, f"a record is a JSON object, got {type(rec).__name__}")
        if MALFORMED_KEY in rec:  # a line the driver could not decode as JSON
            raise Reject(chem.MALFORMED_ROW, rec[MALFORMED_KEY])
        for key in ("instruction", "input", "output"):
            if not isinstance(rec.get(key), str):
                raise Reject(chem.MISSING_FIELD, key)
        mols = [encode(m) for m in self._molecules(rec["input"])]
        output = rec["output"].strip()
        out_smiles = None
        if _looks_like_selfies(output):  # a molecule-valued answer: keep its canonical SMILES for evaluation
            out_smiles = ".".join(
                chem.Chem.MolToSmiles(self.std.component(chem.parse_smiles(chem.selfies_to_smiles(part))))
                for part in output.split(".")
            )
        meta = rec.get("metadata")
        scalars = {
            "instruction": rec["instruction"], "input": rec["input"], "output": rec["output"],
            "metadata": None if meta is None else json.dumps(meta, ensure_ascii=False), "output_smiles": out_smiles,
        }
        return scalars, {"": mols}

    def _molecules(self, text: str) -> list:
        """Molecules of an instruction input: SELFIES (Mol-Instructions), else one SMILES, else none (prose).

        Reaction-style inputs ('reactants>>product', 'a.b') give every component in the written order.
        """
        text = text.strip()
        if _looks_like_selfies(text):
            parts = [p for p in re.split(r"[>.]", text) if p]
            return [self.std.component(chem.parse_smiles(chem.selfies_to_smiles(p))) for p in parts]
        if text and not any(c.isspace() for c in text):
            mol = chem.Chem.MolFromSmiles(text)
            if mol is not None:
                parts = [p for p in re.split(r"[>.]", text) if p]
                return [self.std.component(chem.parse_smiles(p)) for p in parts]
        return []


def process_chunk(processor: RowProcessor, first_row: int, records: list) -> tuple[pa.Table, list[dict]]:
    """All rows of one chunk: the accepted rows as a table, and one reject dict per rejected row."""
    out = ChunkBuilder(processor.fmt)
    rejects = []
    for k, rec in enumerate(records):
        row = first_row + k
        try:
            scalars, blocks = processor.process(rec)
        except Reject as r:
            rejects.append({"row": row, "input": _show(rec), "reason": r.reason, "detail": r.detail})
            continue
        except Exception as e:  # an RDKit/SELFIES failure we did not foresee: recorded, never fatal
            rejects.append({"row": row, "input": _show(rec), "reason": "internal_error", "detail": repr(e)[:300]})
            continue
        scalars["row"] = row
        out.add(scalars, blocks)
    return out.table(), rejects


def _show(rec) -> str:
    if isinstance(rec, (list, tuple)):
        return "\t".join("" if v is None else str(v) for v in rec)[:1000]
    if isinstance(rec, dict):
        if MALFORMED_KEY in rec:
            return rec["line"]
        return json.dumps(rec, ensure_ascii=False)[:1000]
    return str(rec)[:1000]
