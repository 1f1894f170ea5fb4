"""Batches of instruction samples: packed rows (the default) or padded batches (the baselines).

Batch plans are pure functions of (sample lengths, seed, epoch), so every rank and every resumed run
computes the same plan; `BatchPlan` is the batch sampler that gives each rank its share.
  packed   shuffle, then first-fit-decreasing within windows of `window` samples into rows of at most
           `budget` tokens; `rows` rows per micro-batch. Row order is shuffled again, so lengths stay mixed.
  padded   shuffle, `batch_size` samples per batch, padded to the longest (InstructMol / HIGHT).
  grouped  HF/LLaVA length grouping: shuffle, sort within mega-batches of 50 batches, pad to the longest.

`collate` lays samples out in rows and says, per token, which sample it belongs to (`seq_id`). The model
turns `seq_id` into a block-diagonal causal mask (eager / SDPA) or relies on the restarted position ids
(flash-attention varlen), so attention never crosses samples. `targets[t]` is the token to predict at
position t: the next token when it is an answer token of the same sample, else -100; so prompt and
graph positions, and the first token of each sample (it would be predicted from the previous sample),
are never learned.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100
MODES = ("packed", "padded", "grouped")


def first_fit_decreasing(idx: np.ndarray, lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Bins of sample indices with summed length <= budget (longest first into the first bin with room)."""
    order = idx[np.argsort(-lengths[idx], kind="stable")]
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order.tolist():
        n = int(lengths[i])
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens, more than the packing budget {budget}")
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return bins


def plan_batches(lengths: np.ndarray, mode: str, seed: int, epoch: int, *, budget: int = 2048, rows: int = 1,
                 window: int = 1024, batch_size: int = 8, shuffle: bool = True) -> list[list[int]]:
    """Every batch of one epoch, as lists of sample indices (packed: row after row)."""
    rng = np.random.default_rng([seed, epoch])
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if mode == "packed":
        bins = []
        for s in range(0, len(order), window):
            chunk = first_fit_decreasing(order[s:s + window], lengths, budget)
            bins += [chunk[j] for j in rng.permutation(len(chunk))] if shuffle else chunk
        return [sum(bins[s:s + rows], []) for s in range(0, len(bins), rows)]
    if mode == "grouped":
        mega = batch_size * 50
        order = np.concatenate([sorted(order[s:s + mega], key=lambda i: -lengths[i])
                                for s in range(0, len(order), mega)] or [order]).astype(np.int64)
        batches = [order[s:s + batch_size].tolist() for s in range(0, len(order), batch_size)]
        return [batches[j] for j in rng.permutation(len(batches))] if shuffle else batches
    if mode == "padded":
        return [order[s:s + batch_size].tolist() for s in range(0, len(order), batch_size)]
    raise ValueError(f"batching mode must be one of {MODES}, not {mode!r}")


class BatchPlan(torch.utils.data.Sampler):
    """This rank's batches of `plan_batches`: batch r, r + world, ... (the same count on every rank, a
    multiple of `multiple`, e.g. grad_accum; the few left over go, reshuffled into the next epoch).
    It shards itself, so it is used outside `accelerator.prepare`; `set_epoch` reshuffles."""

    def __init__(self, lengths, mode: str = "packed", seed: int = 0, rank: int = 0, world: int = 1,
                 multiple: int = 1, **kw):
        self.lengths, self.mode, self.seed, self.kw, self.epoch = np.asarray(lengths), mode, seed, kw, 0
        self.rank, self.world, self.multiple = rank, world, multiple
        self._plan = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._plan = epoch, None

    def plan(self) -> list[list[int]]:
        if self._plan is None:
            full = plan_batches(self.lengths, self.mode, self.seed, self.epoch, **self.kw)
            per_rank = len(full) // self.world // self.multiple * self.multiple
            if per_rank == 0:
                raise ValueError(f"{len(full)} batches cannot give each of {self.world} ranks {self.multiple}: "
                                 "use more data, a smaller budget / batch size, or less accumulation")
            self._plan = full[self.rank::self.world][:per_rank]
        return self._plan

    def __iter__(self):
        return iter(self.plan())

    def __len__(self) -> int:
        return len(self.plan())


@dataclass
class Collator:
    """Builds model inputs from dataset items (`trainer.dataset.instructions.InstructionDataset`).

    packed=True: items fill rows of at most `budget` tokens in the order given (next fit), so a
    `BatchPlan` packed batch gives exactly its planned rows. packed=False: one sample per row.
    Rows are padded to the longest row rounded up to `pad_to_multiple`.
    """

    pad_id: int
    packed: bool = True
    budget: int = 2048
    pad_to_multiple: int = 8

    def rows(self, lengths: list[int]) -> list[list[int]]:
        if not self.packed:
            return [[k] for k in range(len(lengths))]
        out, used = [[]], 0
        for k, n in enumerate(lengths):
            if used + n > self.budget and out[-1]:
                out.append([])
                used = 0
            out[-1].append(k)
            used += n
        return out

    def __call__(self, items: list[dict]) -> dict:
        from torch_geometric.data import Batch

        rows = self.rows([len(it["input_ids"]) for it in items])
        width = max(sum(len(items[k]["input_ids"]) for k in r) for r in rows)
        width = -(-width // self.pad_to_multiple) * self.pad_to_multiple
        R = len(rows)
        ids = np.full((R, width), self.pad_id, dtype=np.int64)
        pos = np.zeros((R, width), dtype=np.int64)
        tgt = np.full((R, width), IGNORE, dtype=np.int64)
        seq = np.zeros((R, width), dtype=np.int64)
        spans, graphs = [], []
        for r, members in enumerate(rows):
            at = 0
            for s, k in enumerate(members):
                it = items[k]
                x, n, p = it["input_ids"], len(it["input_ids"]), it["num_prompt"]
                ids[r, at:at + n] = x
                pos[r, at:at + n] = np.arange(n)
                seq[r, at:at + n] = s
                # position t predicts token t+1: learned only where t+1 is an answer token (t+1 >= p)
                tgt[r, at + p - 1:at + n - 1] = x[p:]
                spans.append((r, at, n, it["index"]))
                graphs += it["graphs"]
                at += n
            pos[r, at:] = np.arange(width - at)  # the padding tail is a block of its own
            seq[r, at:] = len(members)
        return {
            "input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos),
            "targets": torch.from_numpy(tgt), "seq_id": torch.from_numpy(seq),
            "graphs": Batch.from_data_list(graphs) if graphs else None, "num_mols": len(graphs),
            "real": torch.from_numpy(seq < np.array([[len(r)] for r in rows])),  # not padding
            "cu_seqlens": torch.tensor(np.cumsum([0] + [n for _, _, n, _ in spans]), dtype=torch.int32),
            "spans": spans,  # (row, start, length, dataset index) of every sample
            "real_tokens": int(sum(n for _, _, n, _ in spans)), "label_tokens": int((tgt != IGNORE).sum()),
            "cond": condition_inputs([items[k] for r in rows for k in r]),
        }


def _padded(seqs: list) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([len(c) for c in seqs] + [1])
    ids = np.zeros((len(seqs), width), dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=bool)
    for s, c in enumerate(seqs):
        ids[s, :len(c)] = c
        mask[s, :len(c)] = True
    return torch.from_numpy(ids), torch.from_numpy(mask)


def condition_inputs(items: list[dict]) -> dict:
    """Per-sample inputs beyond the token rows, for items in batch order: the instruction tokens (what a
    dynamic projector conditions on) and the input SELFIES tokens (the graph-SELFIES contrastive loss), each
    padded with a mask; the task id; the sample of every molecule (graphs in item order)."""
    cond_ids, cond_mask = _padded([it.get("cond_ids", ()) for it in items])
    selfies_ids, selfies_mask = _padded([it.get("selfies_ids", ()) for it in items])
    mol_sample = [s for s, it in enumerate(items) for _ in it["graphs"]]
    return {"cond_ids": cond_ids, "cond_mask": cond_mask, "selfies_ids": selfies_ids, "selfies_mask": selfies_mask,
            "task_ids": torch.tensor([it.get("task", 0) for it in items], dtype=torch.long),
            "mol_sample": torch.tensor(mol_sample, dtype=torch.long)}
