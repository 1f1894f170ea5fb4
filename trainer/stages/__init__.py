"""Training stages. Each module has a `Config` dataclass, `validate(cfg)` (file checks, no compute) and
`run(cfg, accelerator, run_dir, seed) -> metrics`. `trainer/run.py` runs the ones a recipe lists."""
import importlib

STAGES = {
    "encoder_ssl": "trainer.stages.encoder_ssl",  # stage 0a: multi-level self-supervision
    "encoder_contrastive": "trainer.stages.encoder_contrastive",  # stage 0b: graph-text InfoNCE
    "align_selfies": "trainer.stages.align_selfies",  # graph -> SELFIES alignment of the projector
    "align": "trainer.stages.align",  # stage 1: projector only
    "lora": "trainer.stages.lora",  # stage 2: projector + LoRA
}


def stage_module(name: str):
    return importlib.import_module(STAGES[name])
