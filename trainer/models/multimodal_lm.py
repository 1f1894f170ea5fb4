"""The multimodal model: hierarchical graph encoder -> projector -> graph tokens spliced into a causal LM.

One batched encoder call per step over every molecule of the micro-batch. A rank whose batch has no
molecule (prose-only inputs) encodes a one-atom stand-in and adds its tokens times zero, so every
rank calls the same modules with the same parameters (DDP buckets and ZeRO-3 gathers would otherwise
hang or fail). The loss is computed on answer positions only: the LM head (vocab x hidden, the
largest matmul of a small LLaMA) never runs on prompt, graph or padding positions.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import VARLEN
from ..dataset.collator import IGNORE


class LossOutput(NamedTuple):
    loss_sum: torch.Tensor  # summed token cross-entropy (normalise by label tokens across steps/ranks)
    num_tokens: torch.Tensor


def _stand_in_graph():
    """A one-atom molecule (one motif, one graph node) for batches without molecules."""
    from torch_geometric.data import Batch

    from graph.dataset import to_pyg
    from graph.features import ATOM_FEATURES, BOND_FEATURES
    from graph.hierarchy import MolGraph

    g = MolGraph(np.zeros((1, len(ATOM_FEATURES)), np.uint8), np.zeros((0, 2), np.int32),
                 np.zeros((0, len(BOND_FEATURES)), np.uint8), np.zeros(1, np.int32), 1)
    return Batch.from_data_list([to_pyg(g)])


def block_causal_mask(seq_id: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, 1, L, L] additive mask: position i sees j iff j <= i and both belong to the same sample."""
    L = seq_id.size(1)
    causal = torch.ones(L, L, dtype=torch.bool, device=seq_id.device).tril()
    allowed = (seq_id.unsqueeze(2) == seq_id.unsqueeze(1)) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seq_id.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


class MultimodalLM(nn.Module):
    def __init__(self, llm, encoder, projector, graph_token_id: int, freeze_encoder: bool = True):
        super().__init__()
        self.llm, self.encoder, self.projector = llm, encoder, projector
        self.graph_token_id = graph_token_id
        self.last_graph = None
        self.freeze_encoder = freeze_encoder and encoder is not None
        if self.freeze_encoder:
            encoder.requires_grad_(False)
            encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # frozen: BatchNorm statistics must not move either
        return self

    # -- pieces of the LM that PEFT wrapping does not change ------------------------------------------
    def _base(self):
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    @property
    def decoder(self):
        return self._base().get_decoder()

    @property
    def lm_head(self):
        return self._base().get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return next(self.lm_head.parameters()).device  # a plain head or its row blocks (vocab_chunks)

    # -- graph tokens ----------------------------------------------------------------------------------
    @property
    def dynamic(self) -> bool:
        return self.projector is not None and self.projector.cfg.kind == "dynamic"

    def condition(self, cond: dict | None) -> dict | None:
        """Per-molecule condition of a dynamic projector from the batch's `cond` (trainer.dataset.collator.condition_inputs):
        the mean frozen input embedding of each molecule's instruction tokens, or its task id."""
        if not self.dynamic:
            return None
        if cond is None:
            raise ValueError("a dynamic projector needs the batch's `cond` (instruction tokens / task ids)")
        dev = self.device
        ms = cond["mol_sample"].to(dev)
        if self.projector.cfg.condition == "task":
            return {"mol_task": cond["task_ids"].to(dev)[ms]}
        vec = self.pooled_embedding(cond["cond_ids"], cond["cond_mask"])
        return {"mol_vec": vec[ms].to(next(self.projector.parameters()).dtype)}

    @torch.no_grad()
    def pooled_embedding(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[samples, hidden] mean frozen input embedding of each row's real tokens (the LLM is frozen, so a
        fixed view of the text: the dynamic projector's condition, the SELFIES side of the alignment loss)."""
        from graph.contrastive import mean_pool

        dev = self.device
        return mean_pool(self.decoder.get_input_embeddings()(ids.to(dev)), mask.to(dev))

    def _stand_in_condition(self) -> dict | None:
        if not self.dynamic:
            return None
        dev, cfg = self.device, self.projector.cfg
        if cfg.condition == "task":
            return {"mol_task": torch.zeros(1, dtype=torch.long, device=dev)}
        return {"mol_vec": torch.zeros(1, cfg.cond_dim, device=dev, dtype=next(self.projector.parameters()).dtype)}

    def graph_tokens(self, graphs, num_mols: int, cond: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(projected graph tokens of every molecule of the batch, molecule after molecule; the molecule of
        each token; a zero scalar tied to the encoder and projector outputs)."""
        stand_in = graphs is None
        if stand_in:
            graphs, num_mols = _stand_in_graph().to(self.device), 1
            mol_cond = self._stand_in_condition()
        else:
            mol_cond = self.condition(cond)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            enc = self.encoder(graphs)
        tokens, mols = self.projector(enc, num_mols, mol_cond)
        if stand_in:
            tokens, mols = tokens[:0], mols[:0]
        return tokens, mols, tokens.sum() * 0.0

    def embed(self, input_ids: torch.Tensor, graphs=None, num_mols: int = 0, cond: dict | None = None) -> torch.Tensor:
        is_graph = input_ids == self.graph_token_id
        x = self.decoder.get_input_embeddings()(input_ids.masked_fill(is_graph, 0))
        if self.encoder is None:
            if is_graph.any():
                raise ValueError("graph placeholders in the input but the model has no graph encoder")
            return x
        tokens, mols, zero = self.graph_tokens(graphs, num_mols, cond)
        self.last_graph = (tokens, mols)  # for auxiliary losses on the same call (align_selfies)
        if tokens.size(0) != int(is_graph.sum()):
            raise ValueError(f"{int(is_graph.sum())} graph placeholders for {tokens.size(0)} graph tokens: the "
                             "prompt and the projector disagree on reduction / levels")
        x = x.masked_scatter(is_graph.unsqueeze(-1), tokens.to(x.dtype))
        return x + zero.to(x.dtype)  # keeps the stand-in's parameters in the graph on every rank

    def hidden(self, batch: dict) -> torch.Tensor:
        x = self.embed(batch["input_ids"], batch.get("graphs"), batch.get("num_mols", 0), batch.get("cond"))
        impl = getattr(self._base().config, "_attn_implementation", "sdpa")
        if impl not in VARLEN:  # eager / sdpa: a block-diagonal causal mask over the rows
            mask = block_causal_mask(batch["seq_id"], x.dtype)
            out = self.decoder(inputs_embeds=x, attention_mask=mask, position_ids=batch["position_ids"], use_cache=False)
            return out.last_hidden_state
        # varlen kernels: real tokens only, flattened to one sequence, with the sample boundaries
        real, cu = batch["real"], batch["cu_seqlens"]
        longest = int((cu[1:] - cu[:-1]).max())
        out = self.decoder(inputs_embeds=x[real].unsqueeze(0), position_ids=batch["position_ids"][real].unsqueeze(0),
                           use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        h = x.new_zeros(x.shape[:2] + out.last_hidden_state.shape[-1:])
        h[real] = out.last_hidden_state[0]
        return h

    def forward(self, batch: dict) -> LossOutput:
        h = self.hidden(batch)
        tgt = batch["targets"]
        sel = tgt != IGNORE
        logits = self.lm_head(h[sel]).float()
        loss = F.cross_entropy(logits, tgt[sel], reduction="sum")
        return LossOutput(loss, sel.sum())

    def logits(self, batch: dict) -> torch.Tensor:
        return self.lm_head(self.hidden(batch)).float()
