"""Stages 1 and 2 of the multimodal model, one loop configured two ways (trainer/stages/align.py, lora.py).

  stage 1 (align)  only the projector trains; the graph encoder and the LLM are frozen
  stage 2 (lora)   the projector and LoRA adapters train; the encoder and the LLM base stay frozen

Data: instruction folders (`python -m graph.preprocess --format instructions`, or trainer.tasks),
several folders = one multitask adapter. Batches: packed rows (default) or padded baselines, each rank
its own share (trainer.collator.BatchPlan). The loss is the mean over every label token of the global
batch (trainer.loop normalises across accumulation and ranks). Works the same under DDP, DeepSpeed
ZeRO-2 and ZeRO-3 (`accelerate launch --config_file launch_configs/accelerate/...`).

Outputs under RUN_DIR/STAGE/: checkpoints/ (exact resume), metrics.jsonl, export/ (trainer.export).
Guards: a fingerprint of the frozen parameters (each rank's own slice) before and after training
must match, and every trained tensor must have moved; both are reported in the summary.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field

import torch

from graph.encoder import EncoderConfig, HierarchicalEncoder

from ..builders import optimizer_and_schedule
from ..config import ConfigError, TrainConfig, check_path
from ..export import gathered_state, load_export, save_export
from ..instructions import InstructionDataset, PromptConfig, TaskMix
from ..loop import prepare_training, train
from ..projector import LEVELS, REDUCTIONS, GraphProjector, ProjectorConfig
from .encoder_ssl import EncoderArch

ATTENTION = ("sdpa_varlen", "sdpa", "eager", "flash_attention_2", "flash_attention_3")


@dataclass
class LLMSettings:
    name: str = "smollm2-135m"  # hub id or local folder; offline aliases: smollm2-135m, tiny-random
    attn_implementation: str = "sdpa_varlen"  # packed samples without masked blocks; flash_attention_2 on GPUs
    dtype: str = "float32"  # bfloat16 on GPUs (with mixed_precision: bf16)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # > 0: embedding and LM head as this many row blocks (trainer.vocab_chunks), so ZeRO-3 gathers one
    # block at a time instead of the whole vocab x hidden matrix; worth it when that matrix is a large
    # share of the model (LLaMA-3.2-1B: 21%; 16 blocks). Same values, other layout; 0: off
    vocab_chunks: int = 0


@dataclass
class ProjectorSettings:
    kind: str = "mlp2"  # linear | mlp2
    per_level: bool = False
    reduction: str = "none"  # none | hierarchical | all
    levels: list[str] = field(default_factory=lambda: list(LEVELS))


@dataclass
class BatchSettings:
    mode: str = "packed"  # packed | padded | grouped
    budget: int = 2048  # tokens per packed row (also the longest sample kept)
    rows: int = 1  # packed rows per micro-batch
    batch_size: int = 8  # samples per micro-batch in the padded modes
    window: int = 1024  # samples shuffled together before packing


@dataclass
class LoraSettings:
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # every linear layer but the head


@dataclass
class Config:
    data: list[str] = field(default_factory=list)  # instruction folders (several: a multitask model)
    llm: LLMSettings = field(default_factory=LLMSettings)
    init_encoder: str | None = "auto"  # auto: RUN_DIR/encoder_contrastive/encoder, else encoder_ssl's
    encoder: EncoderArch = field(default_factory=EncoderArch)  # only when no encoder is found (tests)
    init_projector: str | None = None  # a projector folder; the lora stage defaults to stage 1's
    projector: ProjectorSettings = field(default_factory=ProjectorSettings)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    batching: BatchSettings = field(default_factory=BatchSettings)
    lora: LoraSettings | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, max_steps=100, max_grad_norm=1.0))
    peak_tflops: float = 0.0  # per process, for MFU (e.g. 989 for an H100 in bf16); 0: not reported
    verify_export: bool = True  # reload the export on the main process and compare logits (costs one LLM load)


def validate(cfg: Config, stage: str) -> None:
    if not cfg.data:
        raise ConfigError(f"{stage}.data: list at least one preprocessed instruction folder")
    for i, d in enumerate(cfg.data):
        check_path(d, f"{stage}.data[{i}]", "preprocessed folder")
        if not os.path.exists(os.path.join(d, "manifest.json")):
            raise ConfigError(f"{stage}.data[{i}]: {d} has no manifest.json; run `python -m graph.preprocess "
                              f"--format instructions --input FILE --output {d}` first")
    for key in ("init_encoder", "init_projector"):
        value = getattr(cfg, key)
        if value not in (None, "auto"):
            check_path(value, f"{stage}.{key}", "folder")
    choices = {"llm.attn_implementation": (cfg.llm.attn_implementation, ATTENTION),
               "llm.dtype": (cfg.llm.dtype, ("float32", "bfloat16", "float16")),
               "projector.kind": (cfg.projector.kind, ("linear", "mlp2")),
               "projector.reduction": (cfg.projector.reduction, REDUCTIONS),
               "batching.mode": (cfg.batching.mode, ("packed", "padded", "grouped"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{stage}.{key}: {value!r} is not one of {list(allowed)}")
    if not cfg.projector.levels or set(cfg.projector.levels) - set(LEVELS):
        raise ConfigError(f"{stage}.projector.levels: a non-empty subset of {list(LEVELS)}, got {cfg.projector.levels}")
    if cfg.batching.mode == "packed" and cfg.prompt.max_length > cfg.batching.budget:
        raise ConfigError(f"{stage}.prompt.max_length ({cfg.prompt.max_length}) exceeds batching.budget "
                          f"({cfg.batching.budget}): a sample must fit in a packed row")
    if cfg.lora is not None and (cfg.lora.r < 1 or cfg.lora.alpha <= 0 or not 0 <= cfg.lora.dropout < 1):
        raise ConfigError(f"{stage}.lora: r >= 1, alpha > 0 and 0 <= dropout < 1 (got {cfg.lora})")
    if cfg.llm.vocab_chunks < 0:  # the upper bound (the vocabulary size) is checked once the LLM is loaded
        raise ConfigError(f"{stage}.llm.vocab_chunks: 0 (off) or a number of row blocks, got {cfg.llm.vocab_chunks}")
    if not cfg.prompt.use_graph and not cfg.prompt.use_selfies:
        raise ConfigError(f"{stage}.prompt: use_graph and use_selfies cannot both be false")


def _auto(path: str | None, candidates: list[str]) -> str | None:
    if path != "auto":
        return path
    return next((c for c in candidates if os.path.isdir(c)), None)


def fingerprint(module: torch.nn.Module, trainable: bool) -> dict[str, str]:
    """Hash of each (frozen or trainable) parameter's bytes held by this rank (its ZeRO-3 slice, or all)."""
    out = {}
    for n, p in module.named_parameters():
        if p.requires_grad == trainable:
            t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            out[n] = hashlib.blake2b(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(),
                                     digest_size=16).hexdigest()
    return out


def flops_per_token(model, mean_len: float, label_fraction: float) -> float:
    """Training FLOPs per token with a frozen base: 2N forward + 2N activation gradients for frozen weights,
    6N for trained ones, causal attention (3 x 2 x 2 x layers x width x mean context), the LM head on
    label positions only."""
    def numel(p):  # under ZeRO-3 a parameter's own tensor is empty; ds_numel is its full size
        return getattr(p, "ds_numel", p.numel())

    cfg = model._base().config
    head = sum(numel(p) for p in model.lm_head.parameters())  # one weight, or its row blocks (vocab_chunks)
    frozen = sum(numel(p) for n, p in model.llm.named_parameters() if not p.requires_grad and "embed" not in n
                 and "lm_head" not in n)
    trained = sum(numel(p) for p in model.llm.parameters() if p.requires_grad)
    trained += sum(numel(p) for p in model.projector.parameters()) if model.projector is not None else 0
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * mean_len / 2
    return 4 * frozen + 6 * trained + attention + 4 * head * label_fraction


def build_model(cfg: Config, run_dir: str, stage: str, tok, seed: int):
    """The multimodal model for a stage (frozen encoder, projector, LLM with LoRA in stage 2)."""
    from ..llm import GRAPH_TOKEN, load_llm
    from ..model import MultimodalLM

    dtype = getattr(torch, cfg.llm.dtype)
    _, lm = load_llm(cfg.llm.name, dtype=dtype, attn_implementation=cfg.llm.attn_implementation,
                     trust_remote_code=cfg.llm.trust_remote_code)
    lm.requires_grad_(False)
    if cfg.llm.vocab_chunks:
        from ..vocab_chunks import chunk_vocab

        try:
            chunk_vocab(lm, cfg.llm.vocab_chunks)
        except ValueError as e:  # more blocks than vocabulary rows
            raise ConfigError(f"{stage}.llm.vocab_chunks: {e}") from None
    if cfg.llm.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enc_dir = _auto(cfg.init_encoder, [os.path.join(run_dir, s, "encoder") for s in ("encoder_contrastive", "encoder_ssl")])
    if enc_dir:
        encoder = HierarchicalEncoder.from_pretrained(enc_dir)
    else:
        torch.manual_seed(seed)
        encoder = HierarchicalEncoder(EncoderConfig(**vars(cfg.encoder)))
    p = cfg.projector
    pcfg = ProjectorConfig(in_dim=encoder.out_dim, out_dim=lm.config.hidden_size, kind=p.kind, per_level=p.per_level,
                           reduction=p.reduction, levels=list(p.levels))
    torch.manual_seed(seed)
    projector = GraphProjector(pcfg)
    proj_dir = _auto(cfg.init_projector, [os.path.join(run_dir, "align", "export", "projector")])
    if proj_dir:  # reduction and levels come from this stage's config; the weights from the folder
        saved = GraphProjector.from_pretrained(proj_dir)
        if (saved.cfg.kind, saved.cfg.per_level, saved.cfg.in_dim, saved.cfg.out_dim) != (p.kind, p.per_level, pcfg.in_dim, pcfg.out_dim):
            raise ConfigError(f"{stage}.init_projector: {proj_dir} is a {saved.cfg.kind} projector (per_level="
                              f"{saved.cfg.per_level}, {saved.cfg.in_dim}->{saved.cfg.out_dim}); this stage asks for "
                              f"{p.kind} (per_level={p.per_level}, {pcfg.in_dim}->{pcfg.out_dim})")
        state = saved.state_dict()
        projector.load_state_dict({k: state[k] for k in projector.state_dict()})
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lc = cfg.lora
        targets = lc.target_modules[0] if lc.target_modules == ["all-linear"] else list(lc.target_modules)
        lm = get_peft_model(lm, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                                           task_type="CAUSAL_LM"))
    model = MultimodalLM(lm, encoder if cfg.prompt.use_graph else None, projector if cfg.prompt.use_graph else None,
                         tok.convert_tokens_to_ids(GRAPH_TOKEN))
    if model.projector is not None:
        model.projector.requires_grad_(True)
    return model, {"init_encoder": enc_dir, "init_projector": proj_dir}


def run(cfg: Config, accelerator, run_dir: str, seed: int, stage: str) -> dict:
    from accelerate.utils import send_to_device

    from ..collator import BatchPlan, Collator
    from ..llm import load_tokenizer

    out_dir = os.path.join(run_dir, stage)
    tok = load_tokenizer(cfg.llm.name, cfg.llm.trust_remote_code)
    p = cfg.projector
    data = TaskMix([InstructionDataset(d, tok, reduction=p.reduction, levels=p.levels, prompt=cfg.prompt) for d in cfg.data])
    if len(data) == 0:
        raise ConfigError(f"{stage}.data: no sample fits prompt.max_length={cfg.prompt.max_length}")
    b = cfg.batching
    plan = BatchPlan(data.lengths, b.mode, seed, accelerator.process_index, accelerator.num_processes,
                     multiple=cfg.train.grad_accum, budget=b.budget, rows=b.rows, window=b.window, batch_size=b.batch_size)
    collate = Collator(tok.pad_token_id, packed=b.mode == "packed", budget=b.budget)
    loader = torch.utils.data.DataLoader(data, batch_sampler=plan, collate_fn=collate, num_workers=cfg.train.num_workers)
    model, inits = build_model(cfg, run_dir, stage, tok, seed)
    opt, sched = optimizer_and_schedule(model.parameters(), cfg.train)
    engine, opt = prepare_training(accelerator, model, opt, sched, grad_accum=cfg.train.grad_accum)
    unwrapped = accelerator.unwrap_model(engine)
    trained_before = fingerprint(unwrapped, trainable=True)
    frozen_before = fingerprint(unwrapped, trainable=False)  # after prepare: ZeRO-3 slices now exist
    label_frac = float(sum(len(x) - n for part in data.parts for x, n in zip(part.ids, part.num_prompt))
                       / max(1, data.lengths.sum()))
    fpt = flops_per_token(unwrapped, float(data.lengths.mean()), label_frac)

    def step(m, batch, gen, denominator):
        batch = send_to_device(batch, accelerator.device)
        out = m(batch)
        return out.loss_sum / denominator, {"loss_sum": out.loss_sum.item(), "samples": len(batch["spans"]),
                                            "tokens": batch["real_tokens"]}

    meta = {"llm": cfg.llm.name, "attn_implementation": cfg.llm.attn_implementation, "stage": stage,
            "prompt": dataclasses.asdict(cfg.prompt), "projector": dataclasses.asdict(cfg.projector),
            "lora": dataclasses.asdict(cfg.lora) if cfg.lora else None, "data": cfg.data, "seed": seed}

    def snapshot(folder):  # every checkpoint carries an export: generation from a checkpoint, no unpickling
        save_export(unwrapped, tok, os.path.join(folder, "export"), meta, accelerator)

    metrics = train(accelerator, engine, opt, sched, loader, step, cfg.train, os.path.join(out_dir, "checkpoints"),
                    seed=seed, name=stage, count_fn=lambda bt: bt["label_tokens"], on_epoch=plan.set_epoch,
                    flops_per_token=fpt, peak_flops=cfg.peak_tflops * 1e12, snapshot=snapshot)
    frozen_same = fingerprint(unwrapped, trainable=False) == frozen_before
    trained_after = fingerprint(unwrapped, trainable=True)
    moved = sum(trained_after[k] != v for k, v in trained_before.items())
    flags = accelerator.gather(torch.tensor([float(frozen_same)], device=accelerator.device)).min()
    export = save_export(unwrapped, tok, os.path.join(out_dir, "export"), meta, accelerator)
    checks = {"ranks_identical": ranks_identical(unwrapped, accelerator)}
    if cfg.verify_export:
        probe = send_to_device(collate([data[i] for i in range(min(3, len(data)))]), accelerator.device)
        checks["export_max_abs_logit_diff"] = verify_export(unwrapped, probe, export, os.path.join(out_dir, "probe.safetensors"),
                                                            accelerator)
    accelerator.free_memory(engine, opt)  # the next stage gets a fresh DeepSpeed engine
    return {**metrics, **inits, **checks, "export": export, "samples": len(data),
            "rejected_longer_than_max_length": len(data.rejects), "frozen_params_unchanged": bool(flags.item() == 1.0),
            "trained_tensors": len(trained_before), "trained_tensors_changed": int(moved), "flops_per_token": fpt}


def ranks_identical(model, accelerator) -> bool:
    """Every rank holds the same trained weights (gathered under ZeRO-3): a diverged rank is a bug."""
    from accelerate.utils import gather_object

    state = gathered_state(model, only_trainable=True)
    digest = hashlib.blake2b(b"".join(state[k].contiguous().view(torch.uint8).numpy().tobytes() for k in sorted(state)),
                             digest_size=16).hexdigest()
    digests = gather_object([digest]) if accelerator.num_processes > 1 else [digest]
    return len(set(digests)) == 1


@torch.no_grad()
def verify_export(model, probe: dict, export: str, path: str, accelerator) -> float:
    """Logits of the trained model on a probe batch (every rank: ZeRO-3 forward is collective) against
    the export reloaded from disk with PEFT (main process). The probe and its logits are saved to `path`."""
    from safetensors.torch import save_file

    was_training = model.training
    model.eval()
    logits = model.logits(probe)
    model.train(was_training)
    diff = 0.0
    if accelerator.is_main_process:
        _, reloaded, _ = load_export(export)
        diff = float((reloaded.logits(send_to_cpu(probe)) - logits.cpu()).abs().max())
        save_file({"logits": logits.cpu().contiguous(), "input_ids": probe["input_ids"].cpu().contiguous()}, path)
    accelerator.wait_for_everyone()
    return diff


def send_to_cpu(batch: dict) -> dict:
    from accelerate.utils import send_to_device

    return send_to_device(batch, "cpu")
