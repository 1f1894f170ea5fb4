"""Stage 0a: self-supervised pre-training objectives of the hierarchical encoder (M3LLM).

Four heads read one encoder call over a corrupted copy of the batch (`make_ssl_batch`):

- atom type: a fraction of atoms is masked; predict each one's atomic-number class (cross-entropy).
- bond type: a fraction of bonds (both directions) gets a masked bond type; predict it from the two
  endpoint embeddings (cross-entropy).
- link: another, disjoint fraction of bonds is REMOVED from the input (both directions); classify
  those pairs against sampled non-bonded atom pairs of the same molecule (binary cross-entropy).
- counts: regress the number of atoms and of bonds from the graph-node embedding, on a log1p scale
  (counts span ~5..300, so raw MSE would be ruled by the largest molecules), loss MSE + L1.

A target must not be readable from its own input:
- A masked atom's whole feature row is replaced (`hide_all_features`, default on): atomic_num becomes
  the MASK index and every other column 0, as pretrain-gnns zeroes chirality. Charge, H count,
  hybridisation, aromaticity and degree each narrow the element down, so masking atomic_num alone
  would leave the answer half-visible; with the whole row replaced, a masked atom's input is the same
  constant whatever it was. Its bonds and neighbours stay: they are the context the task is about.
- A masked bond likewise gets bond_type = MASK and stereo / conjugation 0.
- A removed bond is gone from edge_index in both directions (atom features still say each atom's total
  degree, from the molecule, as in pretrain-gnns: a hint that some bond is missing, not which one).
- The bond count target counts removed bonds too, so it cannot be read off the visible edges.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_geometric.data import Data

from .dataset import ATOM, BOND
from .encoder import MASK_ATOM_NUM, MASK_BOND_TYPE, EncoderOutput
from .features import ATOM_VOCAB, BOND_VOCAB

NUM_ATOM_CLASSES = ATOM_VOCAB[0]  # atomic_num classes (MASK excluded)
NUM_BOND_CLASSES = BOND_VOCAB[0]  # bond_type classes (MASK excluded)


@dataclass
class SSLConfig:
    atom_mask_rate: float = 0.15  # fraction of the batch's atoms masked
    bond_mask_rate: float = 0.15  # fraction of bonds whose type is masked
    link_remove_rate: float = 0.15  # fraction of bonds removed for link prediction (disjoint from the above)
    negatives_per_positive: int = 1  # non-bonded pairs sampled per removed bond
    hide_all_features: bool = True  # mask a chosen atom's / bond's whole feature row, not only its type
    w_atom: float = 1.0
    w_bond: float = 1.0
    w_link: float = 1.0
    w_count: float = 1.0


@dataclass
class SSLBatch:
    """The corrupted input and the targets. Atom indices are rows of `EncoderOutput.node`."""

    inputs: Data  # what the encoder reads (x, node_type, edge_index, edge_attr, edge_type, batch, ...)
    atom_rows: torch.Tensor  # [Ka] masked atoms
    atom_target: torch.Tensor  # [Ka] their atomic_num class
    bond_pairs: torch.Tensor  # [2, Kb] endpoints of type-masked bonds
    bond_target: torch.Tensor  # [Kb] their bond_type class
    link_pairs: torch.Tensor  # [2, P + Q] removed bonds, then sampled non-bonded pairs
    link_target: torch.Tensor  # [P + Q] 1.0 for removed bonds, 0.0 for the negatives
    count_target: torch.Tensor  # [B, 2] float: number of atoms, number of bonds (of the original molecule)


def _count(n: int, rate: float) -> int:
    """round(rate * n), at least one when rate > 0 and n > 0."""
    return min(n, max(1, round(rate * n))) if rate > 0 and n > 0 else 0


def _randperm(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    # Drawn on the generator's device (CPU by default), so a seed gives the same masks on any device.
    return torch.randperm(n, generator=generator, device=generator.device if generator else "cpu").to(device)


def make_ssl_batch(batch, cfg: SSLConfig, generator: torch.Generator | None = None) -> SSLBatch:
    """Pure function of (batch, cfg, RNG state): the masked / edge-removed input and every target.

    `batch` is a PyG batch of `graph.dataset.to_pyg` graphs; it is not modified.
    """
    node_type, edge_type = batch.node_type, batch.edge_type
    device, num_nodes = node_type.device, node_type.numel()
    atom_idx = (node_type == ATOM).nonzero().squeeze(1)  # global node ids of atoms, in atom-row order
    n_atoms = atom_idx.numel()
    atom_row = torch.full((num_nodes,), -1, dtype=torch.long, device=device)
    atom_row[atom_idx] = torch.arange(n_atoms, device=device)
    num_graphs = int(batch.num_atoms.numel())

    # Atom masking.
    masked = atom_idx[_randperm(n_atoms, generator, device)[:_count(n_atoms, cfg.atom_mask_rate)]]
    x = batch.x.clone()
    atom_target = x[masked, 0].clone()
    if cfg.hide_all_features:
        x[masked] = 0
    x[masked, 0] = MASK_ATOM_NUM

    # Bonds: each undirected bond once (src < dst), then two disjoint random subsets.
    src, dst = batch.edge_index
    is_bond = edge_type == BOND
    key = torch.minimum(src, dst) * num_nodes + torch.maximum(src, dst)  # same for both directions
    bond_edges = (is_bond & (src < dst)).nonzero().squeeze(1)
    n_bonds = bond_edges.numel()
    order = _randperm(n_bonds, generator, device)
    k_link = _count(n_bonds, cfg.link_remove_rate)
    k_type = min(n_bonds - k_link, _count(n_bonds, cfg.bond_mask_rate))
    removed = bond_edges[order[:k_link]]
    type_masked = bond_edges[order[k_link:k_link + k_type]]

    edge_attr = batch.edge_attr.clone()
    bond_target = edge_attr[type_masked, 0].clone()
    hit = is_bond & torch.isin(key, key[type_masked])  # both directions
    if cfg.hide_all_features:
        edge_attr[hit] = 0
    edge_attr[hit, 0] = MASK_BOND_TYPE
    keep = ~(is_bond & torch.isin(key, key[removed]))

    inputs = Data(
        x=x, node_type=node_type, edge_index=batch.edge_index[:, keep], edge_attr=edge_attr[keep],
        edge_type=edge_type[keep], batch=batch.batch, num_atoms=batch.num_atoms, num_motifs=batch.num_motifs,
    )
    inputs.num_nodes = num_nodes

    # Link prediction: removed bonds vs random non-bonded pairs of the same molecule.
    pos = torch.stack([atom_row[src[removed]], atom_row[dst[removed]]])
    neg = _sample_non_bonds(
        pos, atom_row[src[bond_edges]], atom_row[dst[bond_edges]], batch.num_atoms,
        cfg.negatives_per_positive, generator,
    )
    link_pairs = torch.cat([pos, neg], dim=1)
    link_target = torch.cat([torch.ones(pos.size(1), device=device), torch.zeros(neg.size(1), device=device)])

    num_bonds = torch.bincount(batch.batch[src[bond_edges]], minlength=num_graphs)
    count_target = torch.stack([batch.num_atoms, num_bonds], dim=1).float()
    return SSLBatch(
        inputs=inputs, atom_rows=atom_row[masked], atom_target=atom_target,
        bond_pairs=torch.stack([atom_row[src[type_masked]], atom_row[dst[type_masked]]]), bond_target=bond_target,
        link_pairs=link_pairs, link_target=link_target, count_target=count_target,
    )


def _sample_non_bonds(pos: torch.Tensor, bond_u: torch.Tensor, bond_v: torch.Tensor, num_atoms: torch.Tensor,
                      per_pos: int, generator: torch.Generator | None, tries: int = 10) -> torch.Tensor:
    """[2, <= per_pos * P] atom-row pairs, each inside the molecule of a positive, distinct atoms, not bonded.

    Rejection sampling, vectorised; pairs still invalid after `tries` rounds (tiny, dense molecules)
    are dropped.
    """
    if pos.numel() == 0 or per_pos <= 0:
        return pos.new_zeros(2, 0)
    n_total = int(num_atoms.sum())
    start = torch.cumsum(num_atoms, 0) - num_atoms  # first atom row of each molecule
    mol_of_row = torch.repeat_interleave(torch.arange(num_atoms.numel(), device=pos.device), num_atoms)
    mol = mol_of_row[pos[0]].repeat(per_pos)
    n, s = num_atoms[mol], start[mol]
    bonded = torch.minimum(bond_u, bond_v) * n_total + torch.maximum(bond_u, bond_v)
    u = torch.empty_like(mol)
    v = torch.empty_like(mol)
    todo = torch.ones_like(mol, dtype=torch.bool)
    for _ in range(tries):
        idx = todo.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        r = torch.rand(2, idx.numel(), generator=generator,
                       device=generator.device if generator else "cpu").to(pos.device)
        u[idx] = s[idx] + (r[0] * n[idx]).long().clamp(max=n[idx] - 1)
        v[idx] = s[idx] + (r[1] * n[idx]).long().clamp(max=n[idx] - 1)
        k = torch.minimum(u[idx], v[idx]) * n_total + torch.maximum(u[idx], v[idx])
        bad = (u[idx] == v[idx]) | torch.isin(k, bonded)
        todo[idx] = bad
    return torch.stack([u[~todo], v[~todo]])


def _pair_mlp(dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, out))


def _pair(h: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Order-free features of an atom pair: [h_u + h_v, h_u * h_v]."""
    hu, hv = h[pairs[0]], h[pairs[1]]
    return torch.cat([hu + hv, hu * hv], dim=1)


class SSLHeads(nn.Module):
    """One small MLP per objective, on top of the encoder's embeddings (dim = encoder.out_dim)."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.atom = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, NUM_ATOM_CLASSES))
        self.bond = _pair_mlp(dim, hidden, NUM_BOND_CLASSES)
        self.link = _pair_mlp(dim, hidden, 1)
        self.count = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def _majority(target: torch.Tensor, num_classes: int) -> float:
    """Share of the most frequent class: the accuracy of always guessing it (chance level)."""
    if target.numel() == 0:
        return float("nan")
    return (torch.bincount(target, minlength=num_classes).max() / target.numel()).item()


def _acc(pred: torch.Tensor, target: torch.Tensor) -> float:
    return (pred == target).float().mean().item() if target.numel() else float("nan")


def _classify(logits_fn, target: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy and accuracy of a type head; (zero, nan) when nothing was selected."""
    if not target.numel():
        return zero, float("nan")
    logits = logits_fn()
    return F.cross_entropy(logits, target), _acc(logits.argmax(1), target)


def ssl_losses(out: EncoderOutput, heads: SSLHeads, sb: SSLBatch, cfg: SSLConfig) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the four losses on an encoder output of `sb.inputs`, and per-head metrics."""
    h = out.node
    zero = h.sum() * 0  # keeps the graph connected when a selection is empty (tiny batches)
    metrics: dict = {}

    l_atom, metrics["atom_type_acc"] = _classify(lambda: heads.atom(h[sb.atom_rows]), sb.atom_target, zero)
    metrics["atom_type_majority"] = _majority(sb.atom_target, NUM_ATOM_CLASSES)
    l_bond, metrics["bond_type_acc"] = _classify(lambda: heads.bond(_pair(h, sb.bond_pairs)), sb.bond_target, zero)
    metrics["bond_type_majority"] = _majority(sb.bond_target, NUM_BOND_CLASSES)

    if sb.link_target.numel():
        logits = heads.link(_pair(h, sb.link_pairs)).squeeze(1)
        l_link = F.binary_cross_entropy_with_logits(logits, sb.link_target)
        metrics["link_acc"] = _acc((logits > 0).float(), sb.link_target)
    else:
        l_link, metrics["link_acc"] = zero, float("nan")

    pred = heads.count(out.graph)  # log1p scale
    target = torch.log1p(sb.count_target)
    l_count = F.mse_loss(pred, target) + F.l1_loss(pred, target)
    mae = (torch.expm1(pred.detach()) - sb.count_target).abs().mean(0)  # in atoms / bonds
    metrics.update(count_mae_atoms=mae[0].item(), count_mae_bonds=mae[1].item(), count_mae=mae.mean().item())

    loss = cfg.w_atom * l_atom + cfg.w_bond * l_bond + cfg.w_link * l_link + cfg.w_count * l_count
    metrics.update(loss=loss.item(), loss_atom=l_atom.item(), loss_bond=l_bond.item(), loss_link=l_link.item(),
                   loss_count=l_count.item())
    return loss, metrics


def ssl_step(encoder, heads: SSLHeads, batch, cfg: SSLConfig,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """One stage-0a step: corrupt the batch, one encoder call, the four losses. Call backward yourself."""
    sb = make_ssl_batch(batch, cfg, generator)
    return ssl_losses(encoder(sb.inputs), heads, sb, cfg)
