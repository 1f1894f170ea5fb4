"""Ask a trained model: `python -m trainer.ask --model EXPORT --smiles 'CC(=O)Oc1ccccc1C(=O)O' --task molcap`.

    python -m trainer.ask --model EXPORT_OR_CHECKPOINT --task {molcap,forward,retrosynthesis,reagent,property}
        (--smiles SMILES [--smiles SMILES ...] | --reaction 'A.B>REAGENTS>PRODUCT')
        [--instruction TEXT] [--property homo|lumo|gap] [--max-new-tokens 128] [--num-beams 1]
        [--graph auto|on|off] [--max-heavy-atoms N]

The question goes through the code paths training data went through: the molecules are standardised as
the converters do for that task (trainer.converters: a molecule for description is reduced to its parent,
reaction sides are only normalised, never reduced), written as a Mol-Instructions record, turned into a
shard row with its hierarchical graph by graph.records (what `graph.preprocess` runs), and read back by
the export's own InstructionDataset (`export.dataset_for`: its prompt, reduction and levels); then
`trainer.generate.generate` decodes and `to_smiles` turns a SELFIES answer into SMILES.

Default instruction per task: the first phrasing of `trainer.converters.INSTRUCTIONS[task]` (training
used all of them, picked per row), e.g. molcap "Describe the molecule below: its structure, chemical class
and any known roles."; property fills in the property's name and unit (QM9, Hartree).
Inputs per task: molcap / property one molecule (--smiles); forward the reactants (several --smiles, or
--reaction 'A.B>REAGENTS>': reagents are appended to the reactants as in training); retrosynthesis the
product (--smiles, or --reaction '>>P'); reagent --reaction 'A.B>>P'.

The last stdout line is a JSON object with `answer` (and, for molecule answers, `smiles` and `valid`).
Bad input (unparseable SMILES, a molecule too large for the model's max_length or --max-heavy-atoms, an
export without a graph encoder asked for graph tokens, a missing model) prints one line on stderr and
exits 2. In Python: `Assistant.from_pretrained(EXPORT).ask(smiles=..., task=...)`, `.ask_many([...])`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field

MOLECULE_ANSWERS = ("forward", "retrosynthesis", "reagent")
GRAPH_CHOICES = ("auto", "on", "off")


class AskError(Exception):
    """A question the model cannot be asked (bad SMILES, too large, ...): one line, exit status 2."""


@dataclass
class Question:
    task: str = "molcap"
    smiles: list[str] = field(default_factory=list)
    reaction: str | None = None
    instruction: str | None = None
    property: str = "gap"  # the property task's QM9 property: homo, lumo, gap


def default_instruction(task: str, prop: str = "gap") -> str:
    """The first phrasing of trainer.converters.INSTRUCTIONS for the task (property: name and unit filled)."""
    from .converters import INSTRUCTIONS, QM9_PROPERTIES, QM9_UNIT

    if task not in INSTRUCTIONS:
        raise AskError(f"unknown task {task!r}; choose from {sorted(INSTRUCTIONS)}")
    if task == "property":
        if prop not in QM9_PROPERTIES:
            raise AskError(f"unknown property {prop!r}; choose from {sorted(QM9_PROPERTIES)}")
        return INSTRUCTIONS[task][0].format(name=QM9_PROPERTIES[prop][1], unit=QM9_UNIT)
    return INSTRUCTIONS[task][0]


def _sides(q: Question) -> tuple[str, str, str]:
    """(reactants, reagents, products) text of the question: from --reaction, else --smiles per task."""
    if q.reaction is not None:
        if q.smiles:
            raise AskError("give either --smiles or --reaction, not both")
        sides = q.reaction.strip().split(">")
        if len(sides) != 3:
            raise AskError(f"--reaction must read 'reactants>reagents>products' (two '>'), got {q.reaction!r}")
        return sides[0], sides[1], sides[2]
    joined = ".".join(s.strip() for s in q.smiles if s.strip())
    return ("", "", joined) if q.task == "retrosynthesis" else (joined, "", "")


def question_record(q: Question, std, std_small) -> dict:
    """The Mol-Instructions record of one question, standardised as the converters do for its task."""
    from graph import chem

    from .converters import _join, _texts

    instruction = q.instruction.strip() if q.instruction and q.instruction.strip() else default_instruction(q.task, q.property)
    try:
        if q.task in ("molcap", "property"):
            if q.reaction is not None or len(q.smiles) != 1:
                raise AskError(f"the {q.task} task takes one molecule: one --smiles")
            mol = std.parent(q.smiles[0]) if q.task == "molcap" else std_small.component(chem.parse_smiles(q.smiles[0]))
            smi, sf = _texts([mol])
        else:
            reactants, reagents, products = (std.components(s) for s in _sides(q))
            r, g, p = _texts(reactants), _texts(reagents), _texts(products)
            need = {"forward": [("reactants", r)], "retrosynthesis": [("product", p)],
                    "reagent": [("reactants", r), ("product", p)]}[q.task]
            missing = [name for name, side in need if not side[0]]
            if missing:
                raise AskError(f"the {q.task} task needs the {' and the '.join(missing)} "
                               "(--smiles, or --reaction 'reactants>reagents>products')")
            if q.task == "forward":
                smi, sf = _join(r, g)
            elif q.task == "retrosynthesis":
                smi, sf = p
            else:
                smi, sf = f"{r[0]}>>{p[0]}", f"{r[1]}>>{p[1]}"
    except chem.Reject as e:
        raise AskError(f"bad molecule: {e}") from None
    return {"instruction": instruction, "input": sf, "output": "",
            "metadata": {"task": q.task, "source": "trainer.ask", "input_smiles": smi}}


class Assistant:
    """A loaded export that answers questions; load once, ask many (batched)."""

    def __init__(self, tok, model, meta: dict, folder: str, max_heavy_atoms: int | None = None):
        from graph.chem import Limits, Standardizer
        from graph.records import RowProcessor

        self.tok, self.model, self.meta, self.folder = tok, model, meta, folder
        # Limits as the converters and graph.preprocess use them (property: QM9's small molecules kept)
        self.std = Standardizer(Limits(max_heavy_atoms=max_heavy_atoms))
        self.std_small = Standardizer(Limits(min_heavy_atoms=1, max_heavy_atoms=max_heavy_atoms))
        self.rows = RowProcessor("instructions", {}, Limits(max_heavy_atoms=max_heavy_atoms))

    @classmethod
    def from_pretrained(cls, path: str, max_heavy_atoms: int | None = None, device: str | None = None) -> "Assistant":
        from .models.export import load_export, resolve

        try:
            folder = resolve(path)
        except FileNotFoundError as e:
            raise AskError(str(e)) from None
        tok, model, meta = load_export(folder)
        if device:
            model.to(device)
        return cls(tok, model, meta, folder, max_heavy_atoms)

    def _meta(self, graph: str) -> dict:
        """The export's meta with the prompt's graph switch as asked (auto: the export's own setting)."""
        if graph not in GRAPH_CHOICES:
            raise AskError(f"graph must be one of {GRAPH_CHOICES}, got {graph!r}")
        prompt = dict(self.meta.get("prompt") or {})
        if graph != "auto":
            prompt["use_graph"] = graph == "on"
        if prompt.get("use_graph", True) and self.model.encoder is None:
            raise AskError(f"{self.folder} has no graph encoder (a SELFIES-only export): it cannot read graph "
                           "tokens; ask with --graph off")
        return {**self.meta, "prompt": prompt}

    def ask(self, smiles: str | list[str] | None = None, task: str = "molcap", **kw) -> dict:
        """One question; see Question for the fields and ask_many for generation settings."""
        gen = {k: kw.pop(k) for k in ("max_new_tokens", "num_beams", "graph") if k in kw}
        smiles = [smiles] if isinstance(smiles, str) else list(smiles or [])
        return self.ask_many([Question(task=task, smiles=smiles, **kw)], **gen)[0]

    def ask_many(self, questions: list, batch_size: int = 8, max_new_tokens: int = 128, num_beams: int = 1,
                 graph: str = "auto") -> list[dict]:
        """Answers in order. Questions are Question objects or dicts of its fields; one bad question
        raises AskError naming it (nothing is generated then)."""
        from graph.records import process_chunk

        from .models.export import dataset_for
        from .generate import generate, to_smiles

        qs = [q if isinstance(q, Question) else Question(**q) for q in questions]
        if not qs:
            return []
        meta = self._meta(graph)
        records = []
        for k, q in enumerate(qs):
            try:
                records.append(question_record(q, self.std, self.std_small))
            except AskError as e:
                raise AskError(f"question {k + 1}: {e}" if len(qs) > 1 else str(e)) from None
        table, rejects = process_chunk(self.rows, 0, records)  # shard rows with graphs, as graph.preprocess
        if rejects:
            r = rejects[0]
            raise AskError(f"{'question %d: ' % (r['row'] + 1) if len(qs) > 1 else ''}bad molecule: "
                           f"{r['reason']}{': ' + r['detail'] if r.get('detail') else ''}")
        with tempfile.TemporaryDirectory(prefix="m3mol-ask-") as folder:
            _write_folder(table, folder)
            ds = dataset_for(meta, folder, self.tok)
            if ds.rejects:
                r = ds.rejects[0]
                raise AskError(f"{'question %d: ' % (r['row'] + 1) if len(qs) > 1 else ''}too large: the prompt "
                               f"with its graph tokens is {r.get('length')} tokens, the model's max_length is "
                               f"{ds.prompt.max_length}")
            answers = []
            for s in range(0, len(ds), batch_size):
                items = [ds[k] for k in range(s, min(s + batch_size, len(ds)))]
                answers += generate(self.model, self.tok, items, max_new_tokens=max_new_tokens, num_beams=num_beams)
        out = []
        for q, rec, answer in zip(qs, records, answers):
            res = {"task": q.task, "instruction": rec["instruction"], "input": rec["input"],
                   "input_smiles": rec["metadata"]["input_smiles"], "answer": answer}
            if q.task in MOLECULE_ANSWERS:
                res["smiles"] = to_smiles(answer)
                res["valid"] = res["smiles"] is not None
            out.append(res)
        return out


def _write_folder(table, folder: str) -> None:
    """A one-shard preprocessed folder (the layout graph.preprocess writes) for InstructionDataset."""
    from graph.atomic import atomic_write_json, atomic_write_parquet
    from graph.preprocess import shard_name

    atomic_write_parquet(table, os.path.join(folder, shard_name(0)))
    atomic_write_json({"input_rows": table.num_rows, "accepted": table.num_rows, "rejected": 0,
                       "rejected_by_reason": {}, "shards": [{"file": shard_name(0), "rows": table.num_rows}]},
                      os.path.join(folder, "manifest.json"))


def main(argv: list[str] | None = None) -> int:
    from .converters import INSTRUCTIONS, QM9_PROPERTIES

    p = argparse.ArgumentParser(prog="python -m trainer.ask", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export folder, checkpoint or stage folder")
    p.add_argument("--task", default="molcap", choices=sorted(INSTRUCTIONS))
    p.add_argument("--smiles", action="append", default=[], help="a molecule (repeat for several reactants)")
    p.add_argument("--reaction", help="'reactants>reagents>products', e.g. 'CCO.CC(=O)O>>' (forward)")
    p.add_argument("--instruction", help="the question (default: the task's first training phrasing)")
    p.add_argument("--property", default="gap", choices=sorted(QM9_PROPERTIES))
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--graph", default="auto", choices=GRAPH_CHOICES,
                   help="graph tokens in the prompt: as the export was trained (auto), or forced on / off")
    p.add_argument("--max-heavy-atoms", type=int, default=None, help="refuse larger molecules")
    a = p.parse_args(argv)
    if not a.smiles and a.reaction is None:
        print("error: give a molecule with --smiles or a reaction with --reaction", file=sys.stderr)
        return 2
    question = Question(task=a.task, smiles=a.smiles, reaction=a.reaction, instruction=a.instruction, property=a.property)
    try:
        from graph.chem import Limits, Standardizer
        from transformers.utils import logging as hf_logging

        # a bad molecule fails before the model loads; no weight-loading bars around the one-line answer
        question_record(question, Standardizer(Limits(max_heavy_atoms=a.max_heavy_atoms)),
                        Standardizer(Limits(min_heavy_atoms=1, max_heavy_atoms=a.max_heavy_atoms)))
        hf_logging.disable_progress_bar()
        assistant = Assistant.from_pretrained(a.model, a.max_heavy_atoms)
        res = assistant.ask_many([question], max_new_tokens=a.max_new_tokens, num_beams=a.num_beams, graph=a.graph)[0]
    except AskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Q: {res['instruction']}\n   {res['input_smiles']}\nA: {res['answer']}")
    if "smiles" in res:
        print(f"   SMILES: {res['smiles'] if res['valid'] else '(not a valid molecule)'}")
    print(json.dumps({**res, "model": assistant.folder}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
