"""Instruction samples: preprocessed Mol-Instructions rows -> token ids with graph placeholders, lengths known.

A row (from `python -m graph.preprocess --format instructions`) has `instruction`, `input`, `output`
and the input's molecules as one molecule block, in the order they are written (every reactant of a
reaction, not just the first). The user turn reads

    {instruction}
    Molecule graph: <graph>*k1 . <graph>*k2 ...      (one group per input molecule, written order)
    Input: {input}                                    (the SELFIES; prose inputs always kept)

wrapped in the tokenizer's chat template when it has one. Each molecule's `<graph>` group has exactly
`graph_token_count(...)` placeholders, so a sample's full length (text + graph tokens) is known here,
before batching; the collator packs on it and the model swaps the placeholders for projected tokens.
Labels: only the answer (output + end-of-turn token) is learned.

Each item also carries what a dynamic projector conditions on: `cond_ids` (the instruction's own tokens,
whose mean frozen embedding is the condition) and `task` (the position of the row's metadata.task in the
projector's task list). `selfies_target=True` turns every molecule row into graph -> SELFIES reconstruction
(the align_selfies stage): a fixed instruction, the input SELFIES as the answer, no SELFIES in the prompt.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from graph.dataset import ShardDataset, to_pyg

from ..models.llm import GRAPH_TOKEN
from ..models.projector import graph_token_count

DEFAULT_SYSTEM = ("You are a chemistry assistant. Molecules are given as graph tokens and as SELFIES strings; "
                  "answer with SELFIES when the answer is a molecule.")
SELFIES_INSTRUCTION = "Write the SELFIES string of the molecule given as graph tokens."
COND_TOKENS = 64  # instruction tokens pooled for a dynamic projector's condition
SELFIES_TOKENS = 512  # input SELFIES tokens pooled for the graph-SELFIES contrastive loss


@dataclass
class PromptConfig:
    use_graph: bool = True  # graph tokens in the prompt (off: the SELFIES-only control)
    use_selfies: bool = True  # the SELFIES input text (off: the graph-only control)
    chat_template: bool = True  # the tokenizer's chat template when it has one
    system: str | None = DEFAULT_SYSTEM
    max_length: int = 2048  # longer samples are recorded as rejects, never truncated silently


def user_text(instruction: str, input_text: str, num_mols: int, cfg: PromptConfig) -> str:
    """The user turn with one GRAPH_TOKEN per molecule (expanded to the token count at tokenisation)."""
    parts = [instruction.strip()]
    if cfg.use_graph and num_mols:
        parts.append("Molecule graph: " + " . ".join([GRAPH_TOKEN] * num_mols))
    if input_text.strip() and (cfg.use_selfies or not num_mols):  # prose inputs are not molecules: keep them
        parts.append("Input: " + input_text.strip())
    return "\n".join(parts)


def prompt_text(tokenizer, user: str, cfg: PromptConfig) -> str:
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    head = f"{cfg.system}\n\n" if cfg.system else ""
    return f"{tokenizer.bos_token or ''}{head}### Instruction:\n{user}\n\n### Response:\n"


def expand_placeholders(ids: list[int], graph_id: int, counts: list[int]) -> list[int]:
    """Replace the k-th placeholder by counts[k] copies of it (pure)."""
    out, k = [], 0
    for t in ids:
        if t == graph_id:
            out.extend([graph_id] * counts[k])
            k += 1
        else:
            out.append(t)
    if k != len(counts):
        raise ValueError(f"{k} graph placeholders in the prompt for {len(counts)} molecules")
    return out


class InstructionDataset(torch.utils.data.Dataset):
    """Tokenised instruction samples of one preprocessed folder. `lengths[i]` = text + graph tokens.

    Items: {"input_ids": int64 array, "num_prompt": prompt length (labels start after it),
            "graphs": list of PyG graphs (the input molecules), "row": input row id, "index": i}.
    Samples longer than `max_length` are left out and listed in `rejects` (row, reason, length).
    """

    def __init__(self, folder: str, tokenizer, reduction: str = "none", levels=("node", "motif", "graph"),
                 prompt: PromptConfig | None = None, rows: list[int] | None = None, queries: int = 0,
                 tasks: list[str] | None = None, selfies_target: bool = False):
        self.shards = ShardDataset(folder)
        self.prompt = prompt or PromptConfig()
        if selfies_target and self.prompt.use_selfies:
            raise ValueError("selfies_target: the SELFIES is the answer, so the prompt must not show it (use_selfies=false)")
        self.graph_id = tokenizer.convert_tokens_to_ids(GRAPH_TOKEN)
        cols = ["row", "instruction", "input", "output", "mol_num_atoms", "mol_num_motifs", "metadata"]
        t = _read_columns(folder, self.shards.shard_files, cols)
        n = t.num_rows
        keep = range(n) if rows is None else rows
        instr, inp, out = (t.column(c).to_pylist() for c in ("instruction", "input", "output"))
        atoms, motifs = t.column("mol_num_atoms").to_pylist(), t.column("mol_num_motifs").to_pylist()
        row_ids = t.column("row").to_numpy()
        self.rejects = []
        if selfies_target:  # graph -> SELFIES: rows without a molecule have nothing to reconstruct
            self.rejects = [{"row": int(row_ids[i]), "reason": "no_molecule"} for i in keep if not atoms[i]]
            keep = [i for i in keep if atoms[i]]
            instr = [SELFIES_INSTRUCTION] * n
            out = inp
        metas = t.column("metadata").to_pylist()
        self.task_names = [meta_field(m, "task") for m in metas]
        self.question_types = [meta_field(m, "question_type") for m in metas]
        use_graph = self.prompt.use_graph
        prompts = [prompt_text(tokenizer, user_text(instr[i], inp[i], len(atoms[i]), self.prompt), self.prompt)
                   for i in keep]
        eos = tokenizer.eos_token_id
        p_ids = tokenizer(prompts, add_special_tokens=False).input_ids
        a_ids = tokenizer([out[i] for i in keep], add_special_tokens=False).input_ids
        c_ids = tokenizer([instr[i] for i in keep], add_special_tokens=False).input_ids
        s_ids = tokenizer([inp[i] if atoms[i] else "" for i in keep], add_special_tokens=False).input_ids
        self.index, self.ids, self.num_prompt, self.cond_ids, self.selfies_ids = [], [], [], [], []
        for j, i in enumerate(keep):
            counts = ([graph_token_count(a, m, reduction, levels, queries) for a, m in zip(atoms[i], motifs[i])]
                      if use_graph else [])
            prompt_ids = expand_placeholders(p_ids[j], self.graph_id, counts)
            ids = np.asarray(prompt_ids + a_ids[j] + [eos], dtype=np.int64)
            if len(ids) > self.prompt.max_length:
                self.rejects.append({"row": int(row_ids[i]), "reason": "longer_than_max_length", "length": len(ids)})
                continue
            self.index.append(i)
            self.ids.append(ids)
            self.num_prompt.append(len(prompt_ids))
            self.cond_ids.append(np.asarray(c_ids[j][:COND_TOKENS] or [eos], dtype=np.int64))
            self.selfies_ids.append(np.asarray(s_ids[j][:SELFIES_TOKENS], dtype=np.int64))
        self.lengths = np.array([len(x) for x in self.ids], dtype=np.int64)
        self.row_ids = row_ids[self.index] if self.index else np.zeros(0, np.int64)
        self.outputs = [out[i] for i in self.index]
        self.folder = folder
        self.task_ids = np.zeros(len(self.index), np.int64)
        if tasks:
            self.assign_tasks(tasks)

    def tasks_present(self) -> set:
        return {self.task_names[i] for i in self.index}

    def assign_tasks(self, tasks: list[str]) -> None:
        """Task ids for a task-conditioned projector: every row must name one of its tasks (metadata.task)."""
        unknown = sorted({t or "(none)" for t in self.tasks_present()} - set(tasks))
        if unknown:
            raise ValueError(f"{self.folder}: rows of task(s) {unknown} for a projector conditioned on tasks {list(tasks)}")
        self.task_ids = np.array([tasks.index(self.task_names[i]) for i in self.index], np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> dict:
        i = self.index[k]
        graphs = [to_pyg(g) for g in self.shards.graphs(i)] if self.prompt.use_graph else []
        return {"input_ids": self.ids[k], "num_prompt": self.num_prompt[k], "graphs": graphs,
                "row": int(self.row_ids[k]), "index": k, "cond_ids": self.cond_ids[k], "task": int(self.task_ids[k]),
                "selfies_ids": self.selfies_ids[k]}

    def record(self, k: int) -> dict:
        return self.shards.record(self.index[k])


def metadata_dict(metadata) -> dict | None:
    """A row's metadata as a dict (shards store it as JSON text; graph/records.py), None if absent or not an object."""
    if isinstance(metadata, str):
        import json

        try:
            metadata = json.loads(metadata)
        except ValueError:
            return None
    return metadata if isinstance(metadata, dict) else None


def meta_field(metadata, key: str):
    """metadata[key] of a row, or None."""
    return (metadata_dict(metadata) or {}).get(key)


def _read_columns(folder: str, files: list[str], cols: list[str]):
    import pyarrow as pa

    tables = []
    for f in files:
        path = os.path.join(folder, f)
        have = set(pq.read_schema(path).names)
        t = pq.read_table(path, columns=[c for c in cols if c in have])
        for c in cols:  # optional columns (metadata) of older shards read as nulls
            if c not in have:
                t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
        tables.append(t)
    if not tables:
        raise ValueError(f"{folder}: no accepted rows")
    return pa.concat_tables(tables)



class TaskMix(torch.utils.data.Dataset):
    """Several InstructionDatasets as one (a multitask adapter); items carry their global index."""

    def __init__(self, parts: list[InstructionDataset]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.lengths = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int64)
        self.rejects = [r for p in parts for r in p.rejects]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[InstructionDataset, int]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k], i - int(self.starts[k])

    def __getitem__(self, i: int) -> dict:
        part, j = self.locate(i)
        return {**part[j], "index": i}
