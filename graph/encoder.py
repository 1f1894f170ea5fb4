"""The hierarchical graph encoder: a GIN with edge features over atoms, motifs and the graph node.

MoleculeSTM / GraphMVP style (Hu et al.'s pretrain-gnns GIN): summed per-feature atom embeddings,
per-layer edge embeddings added to the neighbour's state, sum aggregation, a 2x-wide MLP, norm, ReLU
(not after the last layer), dropout, jumping knowledge. The hierarchy is just more nodes and typed
edges (graph.dataset.to_pyg), so ONE encoder call over a PyG batch gives all three levels; `node_type`
keeps them apart and `batch` says which molecule each row belongs to.

Message passing is plain torch rather than `MessagePassing`: the edge embeddings live in a small table
of edge codes, and each layer's whole aggregation is one sparse-dense product (`Adjacency`) with no
[E, H] message tensor.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save

from .atomic import atomic_write_json, atomic_writer
from .dataset import ATOM, BOND, GRAPH, MOTIF, NUM_EDGE_TYPES
from .features import ATOM_VOCAB, BOND_VOCAB

MODEL_TYPE = "m3mol_hierarchical_gin"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"

# One extra index past each vocabulary for masked-prediction objectives (graph.ssl).
MASK_ATOM_NUM = ATOM_VOCAB[0]  # 119: atomic_num column of a masked atom
MASK_BOND_TYPE = BOND_VOCAB[0]  # 5: bond_type column of a masked bond


@dataclass
class EncoderConfig:
    num_layers: int = 5
    hidden: int = 300
    dropout: float = 0.0
    norm: str = "batch"  # batch | layer | none
    jk: str = "last"  # last | sum | concat | max (over the input embedding and every layer's output)
    mlp_ratio: int = 2  # GINE MLP hidden width / hidden (MoleculeSTM: 2)
    # Vocabularies (graph.features), the first column of each with one more slot for MASK.
    atom_vocab: tuple = field(default_factory=lambda: (ATOM_VOCAB[0] + 1, *ATOM_VOCAB[1:]))
    bond_vocab: tuple = field(default_factory=lambda: (BOND_VOCAB[0] + 1, *BOND_VOCAB[1:]))
    num_edge_types: int = NUM_EDGE_TYPES

    def __post_init__(self):
        self.atom_vocab, self.bond_vocab = tuple(self.atom_vocab), tuple(self.bond_vocab)
        if self.norm not in ("batch", "layer", "none"):
            raise ValueError(f"norm must be batch, layer or none, not {self.norm!r}")
        if self.jk not in ("last", "sum", "concat", "max"):
            raise ValueError(f"jk must be last, sum, concat or max, not {self.jk!r}")
        if self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")

    @property
    def out_dim(self) -> int:
        return self.hidden * (self.num_layers + 1) if self.jk == "concat" else self.hidden


class EncoderOutput(NamedTuple):
    """Per-level embeddings, rows in batch order; `*_batch` is the molecule of each row."""

    node: torch.Tensor  # [total atoms, D]
    node_batch: torch.Tensor  # [total atoms]
    motif: torch.Tensor  # [total motifs, D]
    motif_batch: torch.Tensor  # [total motifs]
    graph: torch.Tensor  # [B, D]
    graph_batch: torch.Tensor  # [B] = arange(B)


class AtomEmbedding(nn.Module):
    """Sum of one embedding per categorical feature, as one EmbeddingBag (no [N, F, H] temporary)."""

    def __init__(self, vocab: tuple, hidden: int):
        super().__init__()
        self.register_buffer("offsets", torch.tensor([0, *vocab[:-1]]).cumsum(0), persistent=False)
        self.emb = nn.EmbeddingBag(sum(vocab), hidden, mode="sum")
        with torch.no_grad():  # xavier per feature table, as pretrain-gnns initialises each nn.Embedding
            for start, size in zip(self.offsets.tolist(), vocab):
                nn.init.xavier_uniform_(self.emb.weight[start:start + size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x + self.offsets)


def _mlp(hidden: int, ratio: int) -> nn.Sequential:
    # In-place ReLU: the Linear's output is not needed for its backward, so skip one [N, ratio*H] buffer.
    width = ratio * hidden
    return nn.Sequential(nn.Linear(hidden, width), nn.ReLU(inplace=True), nn.Linear(width, hidden))


def _norm(kind: str, hidden: int) -> nn.Module:
    return {"batch": lambda: nn.BatchNorm1d(hidden), "layer": lambda: nn.LayerNorm(hidden),
            "none": nn.Identity}[kind]()


class GINELayer(nn.Module):
    """h' = MLP((1 + eps) h + sum_{j -> i} (h_j + e_ji)); eps learned, starting at 0 (GIN-eps).

    Edge embeddings: a BOND edge gets the sum of its bond feature embeddings, every other edge type one
    learned vector. Both live in one small table of edge codes (`table`), so the whole aggregation is
    one sparse product, `adj @ [h; table]` (see `Adjacency`).
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden
        self.bond = nn.ModuleList(nn.Embedding(v, h) for v in cfg.bond_vocab)
        self.hier = nn.Embedding(cfg.num_edge_types - 1, h)  # edge types 1.. (all but BOND)
        for e in (*self.bond, self.hier):
            nn.init.xavier_uniform_(e.weight)
        self.eps = nn.Parameter(torch.zeros(1))
        self.mlp = _mlp(h, cfg.mlp_ratio)

    def table(self) -> torch.Tensor:
        """[num_edge_codes, H]: every bond feature combination (mixed radix), then the hierarchy types."""
        t = self.bond[0].weight
        for e in self.bond[1:]:
            t = (t[:, None, :] + e.weight[None, :, :]).flatten(0, 1)
        return torch.cat([t, self.hier.weight])

    def forward(self, h: torch.Tensor, adj: "Adjacency") -> torch.Tensor:
        agg = adj.aggregate(torch.cat([h, self.table()]))
        return self.mlp(torch.addcmul(agg, h, 1 + self.eps))  # (1 + eps) h + agg in one pass


def num_edge_codes(cfg: EncoderConfig) -> int:
    n = 1
    for v in cfg.bond_vocab:
        n *= v
    return n + cfg.num_edge_types - 1


def edge_codes(edge_attr: torch.Tensor, edge_type: torch.Tensor, cfg: EncoderConfig) -> torch.Tensor:
    """Each edge's row in `GINELayer.table()`: its bond feature combination, or its hierarchy type."""
    code = torch.zeros_like(edge_type)
    for col, v in enumerate(cfg.bond_vocab):
        code = code * v + edge_attr[:, col]
    n_bond_codes = num_edge_codes(cfg) - (cfg.num_edge_types - 1)
    return torch.where(edge_type == BOND, code, n_bond_codes + edge_type - 1)


class _SpMM(torch.autograd.Function):
    """a @ x with the transpose precomputed: CPU sparse-dense products beat index_add_ by a wide margin,
    and autograd's own backward re-transposes the CSR matrix on every call."""

    @staticmethod
    def forward(ctx, a, a_t, x):
        ctx.a_t = a_t
        with torch.autocast(a.device.type, enabled=False):  # no bf16 sparse kernel on CPU (MKL); sums stay fp32
            return a @ x

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):  # (a backward called inside an autocast block)
            return None, None, ctx.a_t @ grad.to(ctx.a_t.dtype)


def _csr(rows: torch.Tensor, cols: torch.Tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """CSR matrix counting (row, col) pairs (duplicates summed)."""
    key, count = torch.unique(rows * shape[1] + cols, return_counts=True)  # sorted: row-major order
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(key // shape[1], minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the CPU/CUDA spmm used here is stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, key % shape[1], count.to(dtype), shape, check_invariants=False)


class Adjacency:
    """The per-forward message matrix, shared by every layer: [N, N + C] with one count per
    (destination, source node) and one per (destination, edge code), so that
    `adj @ [h; table]` = sum over incoming edges of (h_src + e_edge)."""

    def __init__(self, edge_index: torch.Tensor, codes: torch.Tensor, num_nodes: int, num_codes: int,
                 dtype: torch.dtype):
        src, dst = edge_index
        rows = torch.cat([dst, dst])
        cols = torch.cat([src, num_nodes + codes])
        shape = (num_nodes, num_nodes + num_codes)
        self.a = _csr(rows, cols, shape, dtype)
        self.a_t = _csr(cols, rows, shape[::-1], dtype)

    def aggregate(self, x: torch.Tensor) -> torch.Tensor:
        # In the counts' dtype (float32 by default): under autocast the MLP may hand back bf16 states.
        return _SpMM.apply(self.a, self.a_t, x.to(self.a.dtype))


class HierarchicalEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or EncoderConfig()
        self.atom_emb = AtomEmbedding(cfg.atom_vocab, cfg.hidden)
        self.kind_emb = nn.Embedding(2, cfg.hidden)  # motif node, graph node (they carry no features)
        nn.init.xavier_uniform_(self.kind_emb.weight)
        self.layers = nn.ModuleList(GINELayer(cfg) for _ in range(cfg.num_layers))
        self.norms = nn.ModuleList(_norm(cfg.norm, cfg.hidden) for _ in range(cfg.num_layers))

    @property
    def out_dim(self) -> int:
        return self.cfg.out_dim

    def embed_nodes(self, batch) -> torch.Tensor:
        """Initial states: atom features summed for atoms, the kind embedding for motif and graph nodes."""
        is_atom = (batch.node_type == ATOM).unsqueeze(1)
        kind = self.kind_emb((batch.node_type - MOTIF).clamp(min=0))
        return torch.where(is_atom, self.atom_emb(batch.x), kind)

    def forward(self, batch) -> EncoderOutput:
        cfg = self.cfg
        h = self.embed_nodes(batch)
        codes = edge_codes(batch.edge_attr, batch.edge_type, cfg)
        adj = Adjacency(batch.edge_index, codes, h.size(0), num_edge_codes(cfg), h.dtype)
        hs = [h]
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms)):
            h = norm(layer(h, adj))
            if i < cfg.num_layers - 1:
                h = F.relu(h, inplace=True)  # norms and Linear keep their inputs, not outputs, for backward
            if cfg.dropout > 0:
                h = F.dropout(h, cfg.dropout, self.training)
            hs.append(h)
        if cfg.jk == "last":
            h = hs[-1]
        elif cfg.jk == "sum":
            h = torch.stack(hs).sum(0)
        elif cfg.jk == "max":
            h = torch.stack(hs).max(0).values
        else:
            h = torch.cat(hs, dim=1)
        return split_levels(h, batch)

    # -- persistence: config.json + model.safetensors, never pickle ---------------------------------
    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_writer(os.path.join(folder, WEIGHTS_NAME), "wb") as f:
            f.write(save(state, metadata={"format": "pt", "model_type": MODEL_TYPE}))
        atomic_write_json({"model_type": MODEL_TYPE, **asdict(self.cfg)}, os.path.join(folder, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, folder: str, map_location: str = "cpu") -> "HierarchicalEncoder":
        with open(os.path.join(folder, CONFIG_NAME)) as f:
            raw = json.load(f)
        if raw.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{folder}: model_type {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
        names = {f.name for f in fields(EncoderConfig)}
        model = cls(EncoderConfig(**{k: v for k, v in raw.items() if k in names}))
        model.load_state_dict(load_file(os.path.join(folder, WEIGHTS_NAME), device=map_location))
        return model


def split_levels(h: torch.Tensor, batch) -> EncoderOutput:
    """Rows of `h` (all nodes, batch order) split into atom / motif / graph levels with molecule ids."""
    nt, b = batch.node_type, batch.batch
    atom, motif, graph = nt == ATOM, nt == MOTIF, nt == GRAPH
    graph_batch = b[graph]  # one graph node per molecule, in molecule order (to_pyg puts it last)
    return EncoderOutput(h[atom], b[atom], h[motif], b[motif], h[graph], graph_batch)


__all__ = [
    "EncoderConfig", "EncoderOutput", "HierarchicalEncoder", "AtomEmbedding", "GINELayer",
    "MASK_ATOM_NUM", "MASK_BOND_TYPE", "MODEL_TYPE", "split_levels",
]
