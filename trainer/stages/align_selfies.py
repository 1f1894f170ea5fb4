"""Graph-SELFIES alignment (between stage 0b and stage 1): make the projected graph tokens predictive of the
molecule's SELFIES, the paper's second open problem (the LLM leans on SELFIES and hardly reads the graph).

Every molecule row of the data becomes "given only its graph tokens, write the SELFIES" (the prompt has no
SELFIES; the answer is the input SELFIES), trained with the LM loss; only the projector trains, the encoder
and the LLM stay frozen. `selfies_contrastive` adds an InfoNCE loss between each sample's mean projected
graph token and the mean frozen-LLM embedding of its SELFIES tokens. Same loop, checkpoints, exact resume
and ZeRO paths as stages 1 and 2 (trainer/stages/multimodal.py). Output: RUN_DIR/align_selfies/export/,
which the align stage (then lora) starts its projector from when `init_projector: auto`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import TrainConfig
from ..dataset.instructions import PromptConfig
from . import multimodal


@dataclass
class Config(multimodal.Config):
    prompt: PromptConfig = field(default_factory=lambda: PromptConfig(use_selfies=False))
    selfies_contrastive: float = 0.1
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, warmup_steps=10, max_steps=200))


def validate(cfg: Config) -> None:
    if cfg.lora is not None:
        raise multimodal.ConfigError("align_selfies.lora: this stage trains the projector only")
    if not cfg.prompt.use_graph:
        raise multimodal.ConfigError("align_selfies.prompt.use_graph: this stage aligns graph tokens; it must be true")
    cfg.prompt.use_selfies = False  # the SELFIES is the answer here, never in the prompt (a partial `prompt:` resets it)
    multimodal.validate(cfg, "align_selfies")


def run(cfg: Config, accelerator, run_dir: str, seed: int) -> dict:
    return multimodal.run(cfg, accelerator, run_dir, seed, "align_selfies", selfies_target=True)
