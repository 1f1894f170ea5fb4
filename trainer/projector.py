"""Graph tokens: which levels, how many tokens per molecule, and the projector to the LLM's width.

Token layout per molecule (the paper's reduction modes, in level order node, motif, graph):
  none          every selected row: n atom tokens, m motif tokens, 1 graph token
  hierarchical  one mean token per selected level (at most 3)
  all           one token: the mean over every selected row
`graph_token_count` is the pure function the collator uses to know a sample's length before batching;
`GraphProjector.forward` must produce exactly that many rows per molecule, in molecule order.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

LEVELS = ("node", "motif", "graph")
REDUCTIONS = ("none", "hierarchical", "all")
CONFIG_NAME, WEIGHTS_NAME = "projector_config.json", "projector.safetensors"


@dataclass
class ProjectorConfig:
    in_dim: int = 300  # encoder width (EncoderConfig.out_dim)
    out_dim: int = 576  # LLM hidden size
    kind: str = "mlp2"  # linear | mlp2 (Linear-GELU-Linear, LLaVA's mlp2x_gelu)
    per_level: bool = False  # separate weights for node / motif / graph rows
    reduction: str = "none"
    levels: list = field(default_factory=lambda: list(LEVELS))

    def __post_init__(self):
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if not self.levels or bad:
            raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {self.levels}")
        self.levels = [lv for lv in LEVELS if lv in self.levels]  # canonical order, no duplicates
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, not {self.reduction!r}")
        if self.kind not in ("linear", "mlp2"):
            raise ValueError(f"projector kind must be linear or mlp2, not {self.kind!r}")


def graph_token_count(num_atoms: int, num_motifs: int, reduction: str, levels) -> int:
    """Graph tokens of one molecule (pure; the collator's length arithmetic)."""
    if reduction == "all":
        return 1
    if reduction == "hierarchical":
        return len(levels)
    return ("node" in levels) * num_atoms + ("motif" in levels) * num_motifs + ("graph" in levels)


def _make(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


def _segment_mean(x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    out = x.new_zeros(n, x.size(1)).index_add_(0, seg, x)
    count = torch.bincount(seg, minlength=n).clamp(min=1).to(x.dtype)
    return out / count.unsqueeze(1)


class GraphProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        # Only the selected levels get weights, so every parameter is used on every call (DDP / ZeRO-3
        # need all ranks to touch the same parameters).
        names = cfg.levels if cfg.per_level else ["shared"]
        self.proj = nn.ModuleDict({n: _make(cfg.kind, cfg.in_dim, cfg.out_dim) for n in names})

    def forward(self, enc, num_mols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [T, out_dim], molecule id of each token [T]) from an EncoderOutput, tokens grouped by
        molecule (molecule 0's tokens first) and, within a molecule, in the layout above."""
        cfg = self.cfg
        rows = {"node": (enc.node, enc.node_batch), "motif": (enc.motif, enc.motif_batch),
                "graph": (enc.graph, enc.graph_batch)}
        toks, mols, order = [], [], []
        for rank, lv in enumerate(cfg.levels):
            h, b = rows[lv]
            h = self.proj[lv if cfg.per_level else "shared"](h)
            if cfg.reduction == "hierarchical":
                h, b = _segment_mean(h, b, num_mols), torch.arange(num_mols, device=h.device)
            toks.append(h)
            mols.append(b)
            order.append(torch.full_like(b, rank))
        h, b, lvl = torch.cat(toks), torch.cat(mols), torch.cat(order)
        if cfg.reduction == "all":
            return _segment_mean(h, b, num_mols), torch.arange(num_mols, device=h.device)
        # group by molecule, level order inside; a stable sort keeps atom / motif order within a level
        key = b * len(LEVELS) + lvl
        perm = torch.sort(key, stable=True).indices
        return h[perm], b[perm]

    # -- persistence: projector_config.json + projector.safetensors ----------------------------------
    def save_pretrained(self, folder: str) -> None:
        from safetensors.torch import save

        from graph.atomic import atomic_write_json, atomic_writer

        os.makedirs(folder, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_writer(os.path.join(folder, WEIGHTS_NAME), "wb") as f:
            f.write(save(state, metadata={"format": "pt"}))
        atomic_write_json(asdict(self.cfg), os.path.join(folder, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, folder: str, map_location: str = "cpu") -> "GraphProjector":
        from safetensors.torch import load_file

        with open(os.path.join(folder, CONFIG_NAME)) as f:
            model = cls(ProjectorConfig(**json.load(f)))
        model.load_state_dict(load_file(os.path.join(folder, WEIGHTS_NAME), device=map_location))
        return model
