"""Vocabulary-chunked input embedding and LM head, so ZeRO-3 never gathers a whole vocabulary matrix.

ZeRO-3 gathers a module's parameters whole around its call. A LLaMA's embedding (and its tied LM head)
is one vocab x hidden tensor, e.g. 21% of LLaMA-3.2-1B, so it is the largest gather of a step and sets a
rank's peak parameter memory. `chunk_vocab(llm, chunks)` splits it into row blocks, each in its own
module, so a rank materialises one block at a time (benchmarks/zero_memory.py):

    chunk_vocab(lm, 16)          # in place, before PEFT wrapping and accelerator.prepare
    lm.get_input_embeddings()    # ChunkedVocab(lookup=True): ids -> hidden, one block after the other
    lm.get_output_embeddings()   # ChunkedVocab(lookup=False): hidden -> logits, the blocks concatenated

Tied models share the blocks between the two (one tensor each, as before); untied ones get two sets.
The blocks are frozen (the base LLM never trains here) and are not `nn.Linear`, so LoRA "all-linear"
leaves them alone. Values are those of the original modules; only the layout changes, so save adapters,
not the chunked base (HF's `tie_weights` / `resize_token_embeddings` do not know this layout).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class VocabChunk(nn.Module):
    """One row block [rows, hidden] of a vocabulary matrix. Both uses go through `__call__`, so ZeRO-3's
    module hooks gather the block before and release it after (and re-gather it for the head's backward)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor, lookup: bool) -> torch.Tensor:
        return F.embedding(x, self.weight) if lookup else F.linear(x, self.weight)


class ChunkedVocab(nn.Module):
    """The input embedding (`lookup`) or the LM head over consecutive row blocks."""

    def __init__(self, chunks: nn.ModuleList, sizes: list[int], lookup: bool):
        super().__init__()
        self.chunks, self.sizes, self.lookup = chunks, list(sizes), lookup
        self.vocab_size = sum(self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lookup:
            return torch.cat([c(x, False) for c in self.chunks], dim=-1)
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.vocab_size):
            raise IndexError(f"token id out of range for a vocabulary of {self.vocab_size}")  # as nn.Embedding
        out, start = None, 0
        for c, rows in zip(self.chunks, self.sizes):
            local = x - start
            hit = (local >= 0) & (local < rows)
            # every block on every rank, also with no id in it: ZeRO-3 gathers are collectives
            emb = c(local[hit], True)
            if out is None:
                out = emb.new_zeros(x.shape + emb.shape[-1:])
            out[hit] = emb
            start += rows
        return out


def chunk_sizes(vocab: int, chunks: int) -> list[int]:
    """Rows per block, the first `vocab % chunks` blocks one row longer."""
    if not 1 <= chunks <= vocab:
        raise ValueError(f"vocab chunks must be in [1, {vocab}] (the vocabulary size), got {chunks}")
    return [vocab // chunks + (i < vocab % chunks) for i in range(chunks)]


def _zero3(w: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (built inside `deepspeed.zero.Init`): its own tensor is empty, `ds_tensor` its slice."""
    return hasattr(w, "ds_id")


def local_range(w: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """(start, n, partition) of a ZeRO-3 parameter on this rank: rank r holds the flat elements
    [r * n, (r + 1) * n) of the tensor (n = partition size, the last rank's tail is padding)."""
    import torch.distributed as dist

    part = w.ds_tensor
    if hasattr(part, "ds_quant_scale") or getattr(part, "final_location", None) is not None:
        raise NotImplementedError("quantised or NVMe-offloaded ZeRO-3 weights are not supported")
    n = part.numel()
    return dist.get_rank(group=w.ds_process_group) * n, n, part


def _rows(w: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of a [vocab, hidden] weight, whole on every rank. A plain weight: a view (the blocks
    share its storage, so chunking copies nothing). A ZeRO-3 parameter holds only its partition: rank r
    has the flat elements [r * n, (r + 1) * n) (n = partition size); each rank puts its overlap with the
    rows into a zero buffer and a byte-wise sum assembles them (the others add zero bytes: exact for every
    dtype), so no rank ever holds more than one block of the old weight. The buffer lives on the device the
    parameter computes on (`w.device`; the partition may be offloaded to CPU, which NCCL cannot reduce)."""
    if not _zero3(w):
        return w.detach()[a:b]
    import torch.distributed as dist

    hidden = w.ds_shape[1]
    start, n, part = local_range(w)
    lo, hi = a * hidden, b * hidden
    buf = torch.zeros(hi - lo, dtype=part.dtype, device=w.device)
    s, e = max(lo, start), min(hi, start + n)
    if s < e:
        buf[s - lo:e - lo] = part.detach()[s - start:e - start].to(w.device)
    dist.all_reduce(buf.view(torch.uint8), group=w.ds_process_group)
    return buf.view(b - a, hidden)


def _chunked(w: torch.Tensor, sizes: list[int]) -> nn.ModuleList:
    """Frozen blocks of `w`, built one at a time; ZeRO-3 partitioned like `w` when `w` is (the same
    zero.Init settings: `convert_to_zero_parameters` broadcasts rank 0's block and keeps each rank's slice)."""
    blocks, start = [], 0
    for rows in sizes:
        block = VocabChunk(_rows(w, start, start + rows))
        if _zero3(w):
            w.convert_to_zero_parameters([block.weight])
        blocks.append(block)
        start += rows
    return nn.ModuleList(blocks)


def chunk_vocab(llm, chunks: int):
    """Replace the input embedding and LM head of a HF causal LM by `chunks` row blocks each (in place;
    returns `llm`). Works on plain and on ZeRO-3 partitioned (built inside `deepspeed.zero.Init`) models;
    the old parameters are dropped."""
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if isinstance(emb, ChunkedVocab):
        raise ValueError("the vocabulary is already chunked")
    w = emb.weight
    vocab = (w.ds_shape if _zero3(w) else w.shape)[0]
    sizes = chunk_sizes(vocab, chunks)
    blocks = _chunked(w, sizes)
    llm.set_input_embeddings(ChunkedVocab(blocks, sizes, lookup=True))
    if head is not None:
        tied = head.weight is w
        shape = head.weight.ds_shape if _zero3(head.weight) else head.weight.shape
        if getattr(head, "bias", None) is not None or shape[0] != vocab:
            raise NotImplementedError(f"vocab chunks: an LM head with a bias or {shape[0]} rows for {vocab} embeddings")
        llm.set_output_embeddings(ChunkedVocab(blocks if tied else _chunked(head.weight, sizes), sizes, lookup=False))
    return llm
