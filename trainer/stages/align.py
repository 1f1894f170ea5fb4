"""Stage 1, alignment: only the projector trains (molecule description by default); encoder and LLM frozen.
Output: RUN_DIR/align/export/ (projector, encoder, tokenizer), the lora stage's starting point. Starts from the
align_selfies stage's projector when the run has one."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import TrainConfig
from . import multimodal


@dataclass
class Config(multimodal.Config):
    init_projector: str | None = "auto"  # auto: RUN_DIR/align_selfies/export/projector when that stage ran
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, warmup_steps=10, max_steps=200))


def validate(cfg: Config) -> None:
    if cfg.lora is not None:
        raise multimodal.ConfigError("align.lora: stage 1 trains the projector only; LoRA belongs to the lora stage")
    multimodal.validate(cfg, "align")


def run(cfg: Config, accelerator, run_dir: str, seed: int) -> dict:
    return multimodal.run(cfg, accelerator, run_dir, seed, "align")
