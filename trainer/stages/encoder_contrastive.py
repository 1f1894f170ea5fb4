"""Stage 0b: graph-text contrastive alignment (MoleculeSTM-style symmetric InfoNCE).

The molecule is its graph-node embedding, the text a mean-pooled Hugging Face encoder (any hub id or
local path; the offline default is MiniLM), both projected to a shared space (graph/contrastive.py).
Data: molecule-text pairs preprocessed from ChEBI-20 layout files (the `text` column).
Validation: graph->text and text->graph retrieval top-1/top-10 among 64 candidates on held-out pairs.
Output: `RUN_DIR/encoder_contrastive/encoder/` (and the projection heads beside it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from graph.contrastive import ContrastiveConfig, ContrastiveHeads, TextEncoder, contrastive_loss, retrieval_accuracy
from graph.dataset import ShardDataset

from ..builders import build_encoder, check_shards, holdout_split, optimizer_and_schedule
from ..config import ConfigError, TrainConfig, check_path
from ..loop import prepare_training, train
from .encoder_ssl import EncoderArch


@dataclass
class Config:
    data: str = "runs/demo/data/chebi20_train"  # preprocessed molecule-text pairs
    val_data: str | None = None  # held-out pairs; None: a hash split of `data`
    heldout_fraction: float = 0.15
    init_encoder: str | None = "auto"  # "auto": RUN_DIR/encoder_ssl/encoder when it exists
    encoder: EncoderArch = field(default_factory=EncoderArch)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    num_candidates: int = 64
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=32, lr=1e-4, max_steps=200))


def validate(cfg: Config) -> None:
    check_shards(cfg.data, "encoder_contrastive.data")
    if cfg.val_data:
        check_shards(cfg.val_data, "encoder_contrastive.val_data")
    if cfg.init_encoder != "auto":
        check_path(cfg.init_encoder, "encoder_contrastive.init_encoder", "encoder folder")
    if cfg.contrastive.temperature <= 0:
        raise ConfigError("encoder_contrastive.contrastive.temperature must be > 0")


class PairDataset(torch.utils.data.Dataset):
    """Graph + description per item; with a frozen text encoder the text embedding is precomputed."""

    def __init__(self, shards: ShardDataset, idx: list[int]):
        self.shards, self.idx = shards, idx
        self.texts = [shards.record(i)["text"] for i in idx]
        self.text_emb = None

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, k):
        d = self.shards[self.idx[k]]
        d.text = self.texts[k]
        if self.text_emb is not None:
            d.text_emb = self.text_emb[k : k + 1]
        return d

    @torch.no_grad()
    def cache_text(self, text_encoder: TextEncoder, rank: int = 0, world: int = 1, batch_size: int = 64) -> None:
        """Embed every text once: each rank embeds a 1/world slice, batched by length so little compute
        goes to padding, and the slices are exchanged so every rank holds all embeddings."""
        from accelerate.utils import gather_object

        text_encoder.eval()
        mine = sorted(range(rank, len(self.texts), world), key=lambda i: len(self.texts[i]))
        emb = torch.cat([text_encoder.encode([self.texts[i] for i in mine[k : k + batch_size]])
                         for k in range(0, len(mine), batch_size)] or [torch.empty(0, text_encoder.dim)])
        parts = gather_object([(mine, emb)]) if world > 1 else [(mine, emb)]
        self.text_emb = torch.empty(len(self.texts), text_encoder.dim)
        for idx, e in parts:
            self.text_emb[torch.tensor(idx, dtype=torch.long)] = e


class ContrastiveModel(torch.nn.Module):
    def __init__(self, encoder, text_encoder: TextEncoder, cfg: ContrastiveConfig):
        super().__init__()
        self.encoder, self.cfg = encoder, cfg
        self.text = None if cfg.freeze_text else text_encoder  # frozen: embeddings come precomputed
        self.heads = ContrastiveHeads(encoder.out_dim, text_encoder.dim, cfg.proj_dim)

    def embed(self, batch):
        text = batch.text_emb if self.text is None else self.text.encode(batch.text)
        return self.heads(self.encoder(batch).graph, text)

    def forward(self, batch, generator=None):
        return contrastive_loss(*self.embed(batch), self.cfg.temperature)


@torch.no_grad()
def evaluate(model: ContrastiveModel, loader, num_candidates: int) -> dict:
    model.eval()
    gs, ts = zip(*(model.embed(b) for b in loader))
    return retrieval_accuracy(torch.cat(gs), torch.cat(ts), num_candidates, ks=(1, 10))


def run(cfg: Config, accelerator, run_dir: str, seed: int) -> dict:
    from torch_geometric.loader import DataLoader

    out_dir = os.path.join(run_dir, "encoder_contrastive")
    shards = ShardDataset(cfg.data)
    if cfg.val_data:
        train_idx, held = list(range(len(shards))), ShardDataset(cfg.val_data)
        held_idx = list(range(len(held)))
    else:
        train_idx, held_idx = holdout_split(len(shards), shards.item_rows().tolist(), cfg.heldout_fraction)
        held = shards
    train_set, held_set = PairDataset(shards, train_idx), PairDataset(held, held_idx)

    init = cfg.init_encoder
    if init == "auto":
        auto = os.path.join(run_dir, "encoder_ssl", "encoder")
        init = auto if os.path.exists(os.path.join(auto, "config.json")) else None
    encoder = build_encoder(init, vars(cfg.encoder))
    text = TextEncoder(cfg.contrastive.text_model, cfg.contrastive.max_length, freeze=cfg.contrastive.freeze_text)
    if cfg.contrastive.freeze_text:
        for ds in (train_set, held_set):
            ds.cache_text(text, accelerator.process_index, accelerator.num_processes)
    model = ContrastiveModel(encoder, text, cfg.contrastive)
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                              num_workers=cfg.train.num_workers)
    held_loader = DataLoader(held_set, batch_size=128)
    opt, sched = optimizer_and_schedule(model.parameters(), cfg.train)
    model, opt, train_loader = prepare_training(accelerator, model, opt, sched, train_loader, cfg.train.grad_accum)
    unwrapped = accelerator.unwrap_model(model)

    def step(m, batch, gen):
        loss, metrics = m(batch, gen)
        return loss, {**metrics, "samples": batch.num_graphs}

    metrics = train(accelerator, model, opt, sched, train_loader, step, cfg.train, os.path.join(out_dir, "checkpoints"),
                    seed=seed, evaluate=lambda: evaluate(unwrapped, held_loader, cfg.num_candidates),
                    name="encoder_contrastive")
    if accelerator.is_main_process:
        unwrapped.encoder.save_pretrained(os.path.join(out_dir, "encoder"))
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in unwrapped.heads.state_dict().items()},
                  os.path.join(out_dir, "encoder", "contrastive_heads.safetensors"))
    accelerator.wait_for_everyone()
    return {**metrics, "init_encoder": init, "train_pairs": len(train_set), "heldout_pairs": len(held_set),
            "encoder": os.path.join(out_dir, "encoder")}
