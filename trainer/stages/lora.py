"""Stage 2, LoRA fine-tuning: projector + LoRA adapters train, encoder and LLM base frozen. One folder in
`data` gives a per-task adapter, several a multitask one. Starts from stage 1's projector
(RUN_DIR/align/export/projector) unless `init_projector` says otherwise.
Output: RUN_DIR/lora/export/ with adapter/ (PeftModel.from_pretrained), projector/, encoder/, tokenizer."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import TrainConfig
from . import multimodal


@dataclass
class Config(multimodal.Config):
    init_projector: str | None = "auto"
    lora: multimodal.LoraSettings | None = field(default_factory=multimodal.LoraSettings)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4, warmup_steps=10, max_steps=300))


def validate(cfg: Config) -> None:
    if cfg.lora is None:
        raise multimodal.ConfigError("lora.lora: the lora stage needs LoRA settings (or use the align stage)")
    multimodal.validate(cfg, "lora")


def run(cfg: Config, accelerator, run_dir: str, seed: int) -> dict:
    return multimodal.run(cfg, accelerator, run_dir, seed, "lora")
