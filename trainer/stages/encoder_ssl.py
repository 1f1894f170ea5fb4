"""Stage 0a: multi-level self-supervised pretraining of the hierarchical graph encoder.

Atom level: atom type, bond type and link prediction on masked / edge-removed input; graph level:
atom and bond counts from the graph node (graph/ssl.py). Data: any preprocessed molecule shards.
Output: `RUN_DIR/encoder_ssl/encoder/` (config.json + model.safetensors) for later stages.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch.utils.data import Subset

from graph.dataset import MoleculeDataset
from graph.ssl import SSLConfig, SSLHeads, make_ssl_batch, ssl_losses

from ..builders import build_encoder, check_shards, holdout_split, optimizer_and_schedule, split_block
from ..config import ConfigError, TrainConfig, check_path
from ..loop import prepare_training, train


@dataclass
class EncoderArch:
    num_layers: int = 5
    hidden: int = 300
    dropout: float = 0.0
    norm: str = "batch"
    jk: str = "last"


@dataclass
class Config:
    # preprocessed folders, every molecule of each row; 'FOLDER:PREFIX' reads one molecule block of
    # reaction rows, e.g. 'uspto:reactants_' (all reactants) or 'uspto:products_'
    data: list[str] = field(default_factory=lambda: ["runs/demo/data/chebi20_train"])
    heldout_fraction: float = 0.1
    max_heldout: int = 2000
    init_encoder: str | None = None  # a saved encoder folder to continue from
    encoder: EncoderArch = field(default_factory=EncoderArch)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64, lr=1e-3, max_steps=200))


def validate(cfg: Config) -> None:
    for i, d in enumerate(cfg.data):
        check_shards(d, f"encoder_ssl.data[{i}]")
    check_path(cfg.init_encoder, "encoder_ssl.init_encoder", "encoder folder")
    if not 0 < cfg.heldout_fraction < 1:
        raise ConfigError("encoder_ssl.heldout_fraction must be in (0, 1)")


class SSLModel(torch.nn.Module):
    """Encoder + heads as one module, so DDP/DeepSpeed wrap (and sync) both in one call."""

    def __init__(self, encoder, cfg: SSLConfig):
        super().__init__()
        self.encoder, self.heads, self.cfg = encoder, SSLHeads(encoder.out_dim), cfg

    def forward(self, batch, generator):
        sb = make_ssl_batch(batch, self.cfg, generator)
        return ssl_losses(self.encoder(sb.inputs), self.heads, sb, self.cfg)


def load_graphs(folders: list[str]):
    sets = [MoleculeDataset(*split_block(d)) for d in folders]
    rows = [(k, int(x)) for k, s in enumerate(sets) for x in s.item_rows()]  # molecules of a row split together
    return torch.utils.data.ConcatDataset(sets), rows


@torch.no_grad()
def evaluate(model: SSLModel, loader, seed: int) -> dict:
    """Held-out head accuracies and count errors, with fixed masks (same seed every evaluation)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed + 12345)
    sums, n = {}, 0
    for batch in loader:
        _, m = model(batch, gen)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


def run(cfg: Config, accelerator, run_dir: str, seed: int) -> dict:
    from torch_geometric.loader import DataLoader

    out_dir = os.path.join(run_dir, "encoder_ssl")
    data, rows = load_graphs(cfg.data)
    train_idx, held_idx = holdout_split(len(data), rows, cfg.heldout_fraction, cfg.max_heldout)
    train_loader = DataLoader(Subset(data, train_idx), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                              num_workers=cfg.train.num_workers)
    held_loader = DataLoader(Subset(data, held_idx), batch_size=256)
    model = SSLModel(build_encoder(cfg.init_encoder, vars(cfg.encoder)), cfg.ssl)
    opt, sched = optimizer_and_schedule(model.parameters(), cfg.train)
    model, opt, train_loader = prepare_training(accelerator, model, opt, sched, train_loader, cfg.train.grad_accum)

    def step(m, batch, gen):
        loss, metrics = m(batch, gen)
        metrics.pop("loss", None)
        return loss, {**metrics, "samples": batch.num_graphs}

    unwrapped = accelerator.unwrap_model(model)
    metrics = train(accelerator, model, opt, sched, train_loader, step, cfg.train, os.path.join(out_dir, "checkpoints"),
                    seed=seed, evaluate=lambda: evaluate(unwrapped, held_loader, seed), name="encoder_ssl")
    if accelerator.is_main_process:
        unwrapped.encoder.save_pretrained(os.path.join(out_dir, "encoder"))
    accelerator.wait_for_everyone()
    return {**metrics, "train_molecules": len(train_idx), "heldout_molecules": len(held_idx),
            "encoder": os.path.join(out_dir, "encoder")}
