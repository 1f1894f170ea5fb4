"""Graph tokens: which levels, how many tokens per molecule, and the projector to the LLM's width.

Token layout per molecule (the paper's reduction modes, in level order node, motif, graph):
  none          every selected row: n atom tokens, m motif tokens, 1 graph token
  hierarchical  one mean token per selected level (at most 3)
  all           one token: the mean over every selected row
`graph_token_count` is the pure function the collator uses to know a sample's length before batching;
`GraphProjector.forward` must produce exactly that many rows per molecule, in molecule order.

kind `dynamic` fuses the levels per molecule with weights that depend on what is asked (the paper's open
problem: each task wants another level). A condition vector per molecule (the mean frozen-LLM embedding of
its instruction tokens, or a learned embedding of its task id) gives level gates g = softmax over the
selected levels; zero-initialised, so training starts from the static projector's uniform mix.
  fusion gate             the static layout above; each level's tokens are scaled by L * g_level (`all`:
                          one token, the g-weighted mean of the level means)
  fusion cross_attention  `queries` learned queries per level attend to that level's rows of the molecule
                          (one attention module per level: LLaMo shares one across levels), plus the
                          condition; then gated as above. Tokens per molecule: queries x levels.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

LEVELS = ("node", "motif", "graph")
REDUCTIONS = ("none", "hierarchical", "all")
KINDS = ("linear", "mlp2", "dynamic")
FUSIONS = ("gate", "cross_attention")
CONDITIONS = ("instruction", "task")
CONFIG_NAME, WEIGHTS_NAME = "projector_config.json", "projector.safetensors"


@dataclass
class ProjectorConfig:
    in_dim: int = 300  # encoder width (EncoderConfig.out_dim)
    out_dim: int = 576  # LLM hidden size
    kind: str = "mlp2"  # linear | mlp2 (Linear-GELU-Linear, LLaVA's mlp2x_gelu) | dynamic (level fusion)
    per_level: bool = False  # separate weights for node / motif / graph rows (always on for dynamic)
    reduction: str = "none"
    levels: list = field(default_factory=lambda: list(LEVELS))
    # dynamic only
    fusion: str = "gate"  # gate | cross_attention
    condition: str = "instruction"  # instruction (pooled frozen-LLM embedding) | task (task id of the sample)
    cond_dim: int = 0  # width of the instruction condition (the LLM hidden size)
    tasks: list = field(default_factory=list)  # condition task: task names (metadata.task), id = position
    queries: int = 4  # cross_attention: learned queries per level
    gate_hidden: int = 64

    def __post_init__(self):
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if not self.levels or bad:
            raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {self.levels}")
        self.levels = [lv for lv in LEVELS if lv in self.levels]  # canonical order, no duplicates
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, not {self.reduction!r}")
        if self.kind not in KINDS:
            raise ValueError(f"projector kind must be one of {KINDS}, not {self.kind!r}")
        if self.kind == "dynamic":
            if self.fusion not in FUSIONS or self.condition not in CONDITIONS:
                raise ValueError(f"dynamic projector: fusion in {FUSIONS}, condition in {CONDITIONS}; got "
                                 f"{self.fusion!r}, {self.condition!r}")
            if self.condition == "task" and not self.tasks:
                raise ValueError("dynamic projector conditioned on the task needs the task names (tasks)")
            if self.fusion == "cross_attention" and self.queries < 1:
                raise ValueError(f"dynamic projector: queries >= 1 per level, got {self.queries}")
            self.per_level = True

    @property
    def layout_queries(self) -> int:
        """Queries per level when the token count is fixed per level (cross-attention), else 0."""
        return layout_queries(vars(self))


def layout_queries(settings: dict) -> int:
    """`graph_token_count`'s `queries` for projector settings (a config / meta dict): the cross-attention
    fusion makes `queries` tokens per level whatever the molecule's size."""
    if settings.get("kind") == "dynamic" and settings.get("fusion") == "cross_attention":
        return int(settings.get("queries", 4))
    return 0


def graph_token_count(num_atoms: int, num_motifs: int, reduction: str, levels, queries: int = 0) -> int:
    """Graph tokens of one molecule (pure; the collator's length arithmetic). `queries` > 0: the
    cross-attention layout, that many tokens per selected level."""
    if queries:
        return queries * len(levels)
    if reduction == "all":
        return 1
    if reduction == "hierarchical":
        return len(levels)
    return ("node" in levels) * num_atoms + ("motif" in levels) * num_motifs + ("graph" in levels)


def _make(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


def segment_mean(x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the rows of x per segment id in [0, n); an empty segment gives zeros."""
    out = x.new_zeros(n, x.size(1)).index_add_(0, seg, x)
    count = torch.bincount(seg, minlength=n).clamp(min=1).to(x.dtype)
    return out / count.unsqueeze(1)


def _padded_by_molecule(h: torch.Tensor, seg: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped per molecule: ([n, longest, d] zero-padded, [n, longest] True where padding)."""
    count = torch.bincount(seg, minlength=n)
    longest = max(1, int(count.max())) if seg.numel() else 1
    order = torch.sort(seg, stable=True).indices
    seg = seg[order]
    start = torch.cumsum(count, 0) - count
    slot = torch.arange(seg.numel(), device=h.device) - start[seg]
    out = h.new_zeros(n, longest, h.size(1))
    out[seg, slot] = h[order]
    pad = torch.ones(n, longest, dtype=torch.bool, device=h.device)
    pad[seg, slot] = False
    return out, pad


class LevelQueries(nn.Module):
    """`queries` learned queries (shifted by the condition) attending to one level's rows of each molecule."""

    def __init__(self, dim: int, queries: int, cond_dim: int):
        super().__init__()
        self.q = nn.Parameter(torch.randn(queries, dim) * dim ** -0.5)
        self.cond = nn.Linear(cond_dim, dim)
        nn.init.zeros_(self.cond.weight)
        nn.init.zeros_(self.cond.bias)
        self.norm = nn.LayerNorm(dim)
        heads = next(k for k in (4, 2, 1) if dim % k == 0)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, h, seg, n, cond):
        kv, pad = _padded_by_molecule(self.norm(h), seg, n)
        q = self.q.unsqueeze(0) + self.cond(cond).unsqueeze(1)  # [n, queries, dim]
        out, _ = self.attn(q, kv, kv, key_padding_mask=pad, need_weights=False)
        return out + q


class GraphProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        # Only the selected levels get weights, so every parameter is used on every call (DDP / ZeRO-3
        # need all ranks to touch the same parameters).
        names = cfg.levels if cfg.per_level else ["shared"]
        self.proj = nn.ModuleDict({n: _make("mlp2" if cfg.kind == "dynamic" else cfg.kind, cfg.in_dim, cfg.out_dim)
                                   for n in names})
        self.last_gates: torch.Tensor | None = None  # [molecules, levels] of the last call (dynamic), detached
        if cfg.kind != "dynamic":
            return
        L = len(cfg.levels)
        if cfg.condition == "task":
            self.task_gates = nn.Embedding(len(cfg.tasks), L)
            nn.init.zeros_(self.task_gates.weight)
            cond_dim = L  # the cross-attention queries read the task's gate logits
        else:
            if cfg.cond_dim < 1:
                raise ValueError("dynamic projector conditioned on the instruction needs cond_dim (the LLM width)")
            self.gate = nn.Sequential(nn.LayerNorm(cfg.cond_dim), nn.Linear(cfg.cond_dim, cfg.gate_hidden), nn.GELU(),
                                      nn.Linear(cfg.gate_hidden, L))
            nn.init.zeros_(self.gate[-1].weight)
            nn.init.zeros_(self.gate[-1].bias)
            cond_dim = cfg.cond_dim
        if cfg.fusion == "cross_attention":
            self.queries = nn.ModuleDict({lv: LevelQueries(cfg.in_dim, cfg.queries, cond_dim) for lv in cfg.levels})

    def gate_logits(self, cond: dict | None) -> torch.Tensor:
        """[molecules, levels] gate logits from the condition: `cond["mol_vec"]` ([molecules, cond_dim], the
        instruction embedding of each molecule's sample) or `cond["mol_task"]` ([molecules] task ids)."""
        if cond is None:
            raise ValueError("a dynamic projector needs the condition of each molecule (instruction or task id)")
        if self.cfg.condition == "task":
            return self.task_gates(cond["mol_task"])
        return self.gate(cond["mol_vec"])

    def forward(self, enc, num_mols: int, cond: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [T, out_dim], molecule id of each token [T]) from an EncoderOutput, tokens grouped by
        molecule (molecule 0's tokens first) and, within a molecule, in the layout above."""
        cfg = self.cfg
        rows = {"node": (enc.node, enc.node_batch), "motif": (enc.motif, enc.motif_batch),
                "graph": (enc.graph, enc.graph_batch)}
        gates = None
        if cfg.kind == "dynamic":
            logits = self.gate_logits(cond)
            gates = torch.softmax(logits.float(), dim=-1).to(enc.node.dtype)  # [molecules, levels]
            self.last_gates = gates.detach()
        if cfg.kind == "dynamic" and cfg.fusion == "cross_attention":
            c = logits if cfg.condition == "task" else cond["mol_vec"]
            L, q = len(cfg.levels), cfg.queries
            out = torch.stack([self.proj[lv](self.queries[lv](*rows[lv], num_mols, c.to(enc.node.dtype)))
                               for lv in cfg.levels], 1)  # [molecules, levels, queries, out_dim]
            out = out * (L * gates)[:, :, None, None]
            mols = torch.arange(num_mols, device=out.device).repeat_interleave(L * q)
            return out.reshape(-1, cfg.out_dim), mols
        toks, mols, order = [], [], []
        for rank, lv in enumerate(cfg.levels):
            h, b = rows[lv]
            h = self.proj[lv if cfg.per_level else "shared"](h)
            if cfg.reduction == "hierarchical" or (gates is not None and cfg.reduction == "all"):
                h, b = segment_mean(h, b, num_mols), torch.arange(num_mols, device=h.device)
            if gates is not None:  # uniform gates (1 / L) leave a level's tokens as they are
                h = h * (len(cfg.levels) * gates[b, rank]).unsqueeze(1)
            toks.append(h)
            mols.append(b)
            order.append(torch.full_like(b, rank))
        h, b, lvl = torch.cat(toks), torch.cat(mols), torch.cat(order)
        if cfg.reduction == "all":  # dynamic: the gated level means, averaged = the g-weighted mean
            return segment_mean(h, b, num_mols), torch.arange(num_mols, device=h.device)
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
