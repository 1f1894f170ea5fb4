"""Vocabulary-chunked input embedding and LM head, so ZeRO-3 never gathers a whole vocabulary matrix.

ZeRO-3 gathers a module's parameters whole around its call. A LLaMA's embedding (and its tied LM head)
is one vocab x hidden tensor, e.g. 21% of LLaMA-3.2-1B, so it is the largest gather of a step and sets a
rank's peak parameter memory. `chunk_vocab(llm, chunks)` splits it into row blocks, each in its own
module, so a rank materialises one block at a time (benchmarks/zero_memory.py):

    load_llm(name, vocab_chunks=16)  # at load; under ZeRO-3 no rank ever allocates the whole matrix
    chunk_vocab(lm, 16)          # or in place on a loaded model, before PEFT wrapping and accelerator.prepare
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

from .zero3 import is_zero3_param


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


class VocabChunksError(ValueError):
    """A block count the vocabulary cannot take (a recipe error, reported as such by the stages)."""


def chunk_sizes(vocab: int, chunks: int) -> list[int]:
    """Rows per block, the first `vocab % chunks` blocks one row longer."""
    if not 1 <= chunks <= vocab:
        raise VocabChunksError(f"vocab chunks must be in [1, {vocab}] (the vocabulary size), got {chunks}")
    return [vocab // chunks + (i < vocab % chunks) for i in range(chunks)]


def block_starts(sizes: list[int]) -> list[int]:
    """The first row of each block."""
    return [sum(sizes[:i]) for i in range(len(sizes))]


def _chunked(w: torch.Tensor, sizes: list[int]) -> nn.ModuleList:
    """Frozen blocks of a plain weight: views, so chunking copies nothing."""
    return nn.ModuleList(VocabChunk(w.detach()[a:a + rows]) for a, rows in zip(block_starts(sizes), sizes))


def partitioned_vocab(llm, sizes: list[int]) -> dict:
    """Inside `deepspeed.zero.Init`, on a model built with a one-row placeholder vocabulary: put empty row
    blocks (partitioned as each is created, so a rank allocates one block whole at a time) in place of its
    embedding and LM head. Returns, per block parameter, (the stored matrix's name, first row) for
    `trainer.models.llm.load_partitions`, which fills the blocks."""
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    w = emb.weight
    hidden, dtype = w.ds_shape[1], w.dtype
    tied = head is not None and head.weight is w
    if head is not None and getattr(head, "bias", None) is not None:
        raise NotImplementedError("vocab chunks: an LM head with a bias")
    module_name = {id(m): n for n, m in llm.named_modules()}
    firsts = block_starts(sizes)

    def blocks(owner) -> tuple[nn.ModuleList, dict]:
        name = module_name[id(owner)]
        made = nn.ModuleList(VocabChunk(torch.empty(rows, hidden, dtype=dtype)) for rows in sizes)
        return made, {f"{name}.chunks.{i}.weight": (f"{name}.weight", row) for i, row in enumerate(firsts)}

    emb_blocks, sources = blocks(emb)
    if head is not None:
        head_blocks, head_sources = (emb_blocks, {}) if tied else blocks(head)
        llm.set_output_embeddings(ChunkedVocab(head_blocks, sizes, lookup=False))
        sources.update(head_sources)
    llm.set_input_embeddings(ChunkedVocab(emb_blocks, sizes, lookup=True))
    return sources


def chunk_vocab(llm, chunks: int):
    """Replace the input embedding and LM head of a plain (not ZeRO-3 partitioned) HF causal LM by `chunks`
    row blocks each, views of its matrices (in place; returns `llm`). Under ZeRO-3 the blocks are built at
    load instead: `trainer.models.llm.load_llm(..., vocab_chunks=chunks)`."""
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if isinstance(emb, ChunkedVocab):
        raise ValueError("the vocabulary is already chunked")
    w = emb.weight
    if is_zero3_param(w):
        raise ValueError("chunk_vocab: the model is ZeRO-3 partitioned; build it with "
                         "trainer.models.llm.load_llm(..., vocab_chunks=N), which creates the blocks partitioned")
    sizes = chunk_sizes(w.shape[0], chunks)
    blocks = _chunked(w, sizes)
    llm.set_input_embeddings(ChunkedVocab(blocks, sizes, lookup=True))
    if head is not None:
        tied = head.weight is w
        if getattr(head, "bias", None) is not None or head.weight.shape[0] != w.shape[0]:
            raise NotImplementedError(f"vocab chunks: an LM head with a bias or {head.weight.shape[0]} rows for "
                                      f"{w.shape[0]} embeddings")
        llm.set_output_embeddings(ChunkedVocab(blocks if tied else _chunked(head.weight, sizes), sizes, lookup=False))
    return llm
