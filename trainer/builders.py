"""Small builders the stages share: data from preprocessed shards, optimizer and schedule, the encoder."""
from __future__ import annotations

import os
import zlib

import torch

from .config import ConfigError, TrainConfig, check_path
from .loop import lr_lambda


def split_block(spec: str) -> tuple[str, str]:
    """'FOLDER' or 'FOLDER:PREFIX', PREFIX naming a molecule block of the rows (e.g. 'uspto:products_')."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.endswith("_") and "/" not in tail:
        return head, tail
    return spec, ""


def check_shards(spec: str, key: str) -> None:
    from graph.dataset import ShardDataset

    path, prefix = split_block(spec)
    check_path(path, key, "preprocessed folder")
    if not os.path.exists(os.path.join(path, "manifest.json")):
        raise ConfigError(f"{key}: {path} has no manifest.json; run `python -m graph.preprocess --input FILE "
                          f"--output {path}` first")
    try:
        ShardDataset(path, prefix)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def holdout_split(n: int, rows: list[int], fraction: float, max_heldout: int | None = None) -> tuple[list, list]:
    """Deterministic train / held-out split by a hash of each input row id (stable across runs and ranks)."""
    held = [i for i in range(n) if zlib.crc32(str(rows[i]).encode()) % 10_000 < fraction * 10_000]
    if max_heldout is not None:
        held = held[:max_heldout]
    hs = set(held)
    return [i for i in range(n) if i not in hs], held


def optimizer_and_schedule(params, cfg: TrainConfig):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def build_encoder(init: str | None, cfg_dict: dict):
    """A HierarchicalEncoder from a saved folder, or fresh from config values."""
    from graph.encoder import EncoderConfig, HierarchicalEncoder

    if init:
        return HierarchicalEncoder.from_pretrained(init)
    return HierarchicalEncoder(EncoderConfig(**cfg_dict))
