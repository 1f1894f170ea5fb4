"""`sdpa_varlen`: attention over packed samples without computing the masked-out blocks.

A block-diagonal mask makes SDPA compute the whole (row x row) score matrix and throw most of it away:
with 6 samples in a 2,048-token row that is ~6x the attention work of running them apart. Like the
flash-attention varlen kernels, this runs causal SDPA on each sample's slice of a flattened [1, T]
batch, given `cu_seq_lens_q` (sample boundaries; trainer.models.multimodal_lm passes them), so attention costs
sum(l_i^2), the same as unpadded separate samples, and the causal kernel skips the upper triangle.
Training only: without boundaries (e.g. cached generation) it refuses rather than attend across samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"
VARLEN = (NAME, "flash_attention_2", "flash_attention_3")  # implementations fed flattened samples


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        cu_seq_lens_q=None, **kwargs):
    if cu_seq_lens_q is None:
        raise ValueError(f"{NAME} needs cu_seq_lens_q (packed training batches); generate with 'sdpa'")
    bounds = cu_seq_lens_q.tolist()
    gqa = query.size(1) != key.size(1)
    p = dropout if module.training else 0.0
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=p,
                                           is_causal=True, scale=scaling, enable_gqa=gqa)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, sdpa_varlen_forward)
