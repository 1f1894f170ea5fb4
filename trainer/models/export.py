"""The export folder of a trained multimodal model, and loading it back.

    EXPORT/
      m3mol_config.json      what to rebuild: LLM name, attention, prompt, projector layout, stage, tasks
      adapter/               PEFT LoRA adapter (stage 2): PeftModel.from_pretrained(base_llm, EXPORT/adapter)
      projector/             projector_config.json + projector.safetensors
      encoder/               config.json + model.safetensors (the frozen graph encoder)
      tokenizer files        the tokenizer with the graph placeholder

Under ZeRO-3 every rank holds only slices of the weights, so the trained and encoder parameters are
gathered on EVERY rank (a gather from rank 0 alone writes empty tensors) and the main process writes.
The folder is written as EXPORT.tmp and renamed, so a crash never leaves a half export. Every training
checkpoint holds one too (CHECKPOINT/export/), so a checkpoint is loaded from safetensors and PEFT files,
never by unpickling optimizer shards; `resolve()` finds the export of a stage folder or a checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import torch

from .zero3 import is_zero3_param

CONFIG_NAME = "m3mol_config.json"


def _gathered(params: list):
    """Full parameters inside the block on every rank (ZeRO-3), a no-op otherwise."""
    if any(is_zero3_param(p) for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def gathered_state(module: torch.nn.Module, only_trainable: bool = False) -> dict:
    """A CPU copy of the module's parameters and buffers; collective under ZeRO-3 (call on every rank)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not only_trainable]
    with _gathered([p for _, p in named]):
        state = {n: p.detach().cpu().clone() for n, p in named}
    if not only_trainable:
        persistent = set(module.state_dict())  # not the non-persistent buffers
        state.update({n: b.detach().cpu().clone() for n, b in module.named_buffers() if n in persistent})
    return state


def save_export(model, tokenizer, folder: str, meta: dict, accelerator) -> str:
    """Write the export folder (main process); every rank must call it."""
    from graph.encoder import HierarchicalEncoder

    from .projector import GraphProjector

    proj_state = gathered_state(model.projector) if model.projector is not None else None
    enc_state = gathered_state(model.encoder) if model.encoder is not None else None
    lora_state = None
    if hasattr(model.llm, "peft_config"):
        lora_state = gathered_state(model.llm, only_trainable=True)
    if accelerator.is_main_process:
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if proj_state is not None:  # a SELFIES-only model has no graph side
            proj = GraphProjector(model.projector.cfg)
            proj.load_state_dict(proj_state)
            proj.save_pretrained(os.path.join(tmp, "projector"))
            enc = HierarchicalEncoder(model.encoder.cfg)
            enc.load_state_dict(enc_state)
            enc.save_pretrained(os.path.join(tmp, "encoder"))
        if lora_state is not None:
            model.llm.save_pretrained(os.path.join(tmp, "adapter"), state_dict=lora_state)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=1)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()
    return folder


def _whole_model_loading():
    """Load whole models even inside a ZeRO-3 run (transformers would otherwise partition them with
    deepspeed.zero.Init, a collective that hangs when only the main process loads)."""
    from .llm import _without_hf_zero3

    return _without_hf_zero3()


def resolve(path: str) -> str:
    """The export folder behind `path`: an export, a checkpoint (CKPT/export), or a stage folder
    (RUN_DIR/STAGE: its final export, else its latest checkpoint's). Raises FileNotFoundError otherwise."""
    from ..loop import latest_checkpoint

    candidates = [path, os.path.join(path, "export")]
    latest = latest_checkpoint(os.path.join(path, "checkpoints"))
    if latest:
        candidates.append(os.path.join(latest, "export"))
    for c in candidates:
        if os.path.isfile(os.path.join(c, CONFIG_NAME)):
            return c
    raise FileNotFoundError(f"model not found: {path} is not an export folder ({CONFIG_NAME}), a checkpoint with export/, or a "
                            "stage folder (RUN_DIR/STAGE) with export/ or checkpoints/step-N/export/")


def load_export(folder: str, attn_implementation: str | None = None, dtype: torch.dtype = torch.float32,
                zero3: bool = False):
    """(tokenizer, MultimodalLM, meta) from an export folder (or a checkpoint / stage folder, see resolve);
    the LoRA adapter is loaded with PEFT. The model is whole on the calling process; `zero3=True` (inside
    a DeepSpeed ZeRO-3 run, on every rank: collective): the LLM is built partitioned and streamed from its
    safetensors files as the stages build it (`trainer.models.llm.build_zero3`), so no rank ever holds it
    whole; run it through a DeepSpeed engine (`zero3_inference_engine`)."""
    if zero3:
        return _load_export(resolve(folder), attn_implementation, dtype, zero3=True)
    with _whole_model_loading():
        return _load_export(resolve(folder), attn_implementation, dtype)


def zero3_inference_engine(model, accelerator):
    """A DeepSpeed ZeRO-3 engine without an optimizer around a partitioned model (ZeRO-Inference): its hooks
    gather each module's parameters for the forward. Same DeepSpeed settings as the run's."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from graph.encoder import HierarchicalEncoder

    from .projector import GraphProjector

    if getattr(model, "encoder", None) is not None:
        # the encoder's layers read child embedding tables, the cross-attention projector nn.MultiheadAttention's
        # out_proj weight, without calling those children; under this engine they came out ungathered
        # (DeepSpeed 0.19.8), so both (small) are gathered whole at their forward
        set_z3_leaf_modules(model, [HierarchicalEncoder, GraphProjector])
    config = {k: v for k, v in _inference_config(accelerator).items() if k not in ("optimizer", "scheduler")}
    return deepspeed.initialize(model=model, config=config)[0]


def _inference_config(accelerator) -> dict:
    """The run's DeepSpeed config: Accelerate's filled-in copy once `prepare` ran, else the launch file's with
    its "auto" entries resolved for inference (one sample per rank, no accumulation, the run's precision)."""
    import copy

    if getattr(accelerator, "deepspeed_config", None):
        return accelerator.deepspeed_config
    cfg = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    fill = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    cfg.update({k: v for k, v in fill.items() if cfg.get(k, "auto") == "auto"})
    cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * accelerator.num_processes
    for prec in ("bf16", "fp16"):
        if cfg.get(prec, {}).get("enabled") == "auto":
            cfg[prec]["enabled"] = accelerator.mixed_precision == prec
    left = [k for k, v in cfg.items() if v == "auto"]
    if left:
        raise ValueError(f"DeepSpeed config entries left at 'auto' for inference: {left}; set them in the config file")
    return cfg


def _load_export(folder: str, attn_implementation: str | None, dtype: torch.dtype, zero3: bool = False):
    from transformers import AutoTokenizer

    from graph.encoder import HierarchicalEncoder

    from .llm import GRAPH_TOKEN, load_llm
    from .multimodal_lm import MultimodalLM
    from .projector import GraphProjector

    with open(os.path.join(folder, CONFIG_NAME)) as f:
        meta = json.load(f)
    _, lm = load_llm(meta["llm"], dtype=dtype, attn_implementation=attn_implementation or meta["attn_implementation"],
                     seed=meta.get("llm_seed", 0), zero3=zero3, vocab_chunks=meta.get("vocab_chunks", 0) if zero3 else 0)
    if os.path.isdir(os.path.join(folder, "adapter")):
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, os.path.join(folder, "adapter"))
    tok = AutoTokenizer.from_pretrained(folder)
    graph_side = os.path.isdir(os.path.join(folder, "projector"))
    model = MultimodalLM(lm, HierarchicalEncoder.from_pretrained(os.path.join(folder, "encoder")) if graph_side else None,
                         GraphProjector.from_pretrained(os.path.join(folder, "projector")) if graph_side else None,
                         tok.convert_tokens_to_ids(GRAPH_TOKEN))
    return tok, model.eval(), meta


def dataset_for(meta: dict, folder: str, tok):
    """The instruction dataset of `folder` as the exported model reads it: its prompt, and as many graph
    placeholders as its projector's reduction and levels produce."""
    from ..dataset.instructions import InstructionDataset, PromptConfig

    from .projector import layout_queries

    proj = meta.get("projector") or {}
    kw = {k: proj[k] for k in ("reduction", "levels") if k in proj}
    tasks = proj.get("tasks") if proj.get("kind") == "dynamic" and proj.get("condition") == "task" else None
    return InstructionDataset(folder, tok, prompt=PromptConfig(**meta["prompt"]), queries=layout_queries(proj),
                              tasks=tasks, **kw)
