"""Stages 1 and 2 of the multimodal model, one loop configured two ways (trainer/stages/align.py, lora.py).

  stage 1 (align)  only the projector trains; the graph encoder and the LLM are frozen
  stage 2 (lora)   the projector and LoRA adapters train; the encoder and the LLM base stay frozen

Data: instruction folders (`python -m graph.preprocess --format instructions`, or trainer.dataset.tasks),
several folders = one multitask adapter. Batches: packed rows (default) or padded baselines, each rank
its own share (trainer.dataset.collator.BatchPlan). The loss is the mean over every label token of the global
batch (trainer.loop normalises across accumulation and ranks). Works the same under DDP, DeepSpeed
ZeRO-2 and ZeRO-3 (`accelerate launch --config_file launch_configs/accelerate/...`).

Outputs under RUN_DIR/STAGE/: checkpoints/ (exact resume), metrics.jsonl, export/ (trainer.models.export).
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
from ..dataset.instructions import InstructionDataset, PromptConfig, TaskMix
from ..loop import prepare_training, train
from ..models.export import gathered_state, load_export, save_export, zero3_inference_engine
from ..models.llm import zero3_run
from ..models.projector import (CONDITIONS, FUSIONS, KINDS, LEVELS, REDUCTIONS, GraphProjector, ProjectorConfig, layout_queries,
                         segment_mean)
from .encoder_ssl import EncoderArch

ATTENTION = ("sdpa_varlen", "sdpa", "eager", "flash_attention_2", "flash_attention_3")


@dataclass
class LLMSettings:
    name: str = "smollm2-135m"  # hub id or local folder; offline aliases: smollm2-135m, tiny-random
    attn_implementation: str = "sdpa_varlen"  # packed samples without masked blocks; flash_attention_2 on GPUs
    dtype: str = "float32"  # bfloat16 on GPUs (with mixed_precision: bf16)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # > 0: embedding and LM head as this many row blocks (trainer.models.vocab_chunks), so ZeRO-3 gathers one
    # block at a time instead of the whole vocab x hidden matrix; worth it when that matrix is a large
    # share of the model (LLaMA-3.2-1B: 21%; 16 blocks). Same values, other layout; 0: off
    vocab_chunks: int = 0


@dataclass
class ProjectorSettings:
    kind: str = "mlp2"  # linear | mlp2 | dynamic (per-molecule level fusion, trainer/models/projector.py)
    per_level: bool = False
    reduction: str = "none"  # none | hierarchical | all
    levels: list[str] = field(default_factory=lambda: list(LEVELS))
    fusion: str = "gate"  # dynamic: gate | cross_attention
    condition: str = "instruction"  # dynamic: instruction (pooled frozen-LLM embedding) | task (metadata.task)
    tasks: list[str] = field(default_factory=list)  # condition task: the task names; empty = those in the data
    queries: int = 4  # cross_attention: learned queries per level (tokens per molecule = queries x levels)


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
    # graph-SELFIES alignment: weight of an InfoNCE loss between each sample's mean projected graph token and
    # the mean frozen-LLM embedding of its input SELFIES (0: off; the align_selfies stage turns it on)
    selfies_contrastive: float = 0.0
    contrastive_temperature: float = 0.1
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
               "projector.kind": (cfg.projector.kind, KINDS),
               "projector.reduction": (cfg.projector.reduction, REDUCTIONS),
               "projector.fusion": (cfg.projector.fusion, FUSIONS),
               "projector.condition": (cfg.projector.condition, CONDITIONS),
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
    if cfg.projector.kind == "dynamic" and cfg.projector.fusion == "cross_attention" and cfg.projector.queries < 1:
        raise ConfigError(f"{stage}.projector.queries: at least 1 query per level, got {cfg.projector.queries}")
    if cfg.selfies_contrastive < 0 or cfg.contrastive_temperature <= 0:
        raise ConfigError(f"{stage}.selfies_contrastive >= 0 and contrastive_temperature > 0 (got "
                          f"{cfg.selfies_contrastive}, {cfg.contrastive_temperature})")
    if cfg.selfies_contrastive and not cfg.prompt.use_graph:
        raise ConfigError(f"{stage}.selfies_contrastive: the alignment loss needs graph tokens (prompt.use_graph)")


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
    from ..models.llm import GRAPH_TOKEN, load_llm
    from ..models.multimodal_lm import MultimodalLM
    from ..models.vocab_chunks import VocabChunksError

    dtype = getattr(torch, cfg.llm.dtype)
    try:
        _, lm = load_llm(cfg.llm.name, dtype=dtype, attn_implementation=cfg.llm.attn_implementation,
                         trust_remote_code=cfg.llm.trust_remote_code, vocab_chunks=cfg.llm.vocab_chunks)
    except VocabChunksError as e:  # more blocks than vocabulary rows
        raise ConfigError(f"{stage}.llm.vocab_chunks: {e}") from None
    lm.requires_grad_(False)
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
                           reduction=p.reduction, levels=list(p.levels), fusion=p.fusion, condition=p.condition,
                           cond_dim=lm.config.hidden_size, tasks=list(p.tasks), queries=p.queries)
    torch.manual_seed(seed)
    projector = GraphProjector(pcfg)
    earlier = {"align_selfies": [], "align": ["align_selfies"], "lora": ["align", "align_selfies"]}.get(stage, ["align"])
    proj_dir = _auto(cfg.init_projector, [os.path.join(run_dir, s, "export", "projector") for s in earlier])
    if proj_dir:  # reduction and levels come from this stage's config; the weights from the folder
        init_projector(projector, GraphProjector.from_pretrained(proj_dir), f"{stage}.init_projector: {proj_dir}")
    if cfg.lora is not None:
        from ..models.lora import add_lora  # under ZeRO-3 the adapters are created partitioned

        lc = cfg.lora
        targets = lc.target_modules[0] if lc.target_modules == ["all-linear"] else list(lc.target_modules)
        lm = add_lora(lm, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=targets, task_type="CAUSAL_LM")
    model = MultimodalLM(lm, encoder if cfg.prompt.use_graph else None, projector if cfg.prompt.use_graph else None,
                         tok.convert_tokens_to_ids(GRAPH_TOKEN))
    if model.projector is not None:
        model.projector.requires_grad_(True)
    return model, {"init_encoder": enc_dir, "init_projector": proj_dir}


def init_projector(projector: GraphProjector, saved: GraphProjector, where: str) -> None:
    """Start `projector` from `saved`. Same layout: every weight. A dynamic projector from a static one (or
    another dynamic one): each level's MLP from the saved level's (or its shared) MLP, gates and queries as
    initialised (uniform gates: the static projector's mix) unless the saved one has the same ones."""
    a, b = projector.cfg, saved.cfg
    if (a.in_dim, a.out_dim) != (b.in_dim, b.out_dim) or (a.kind != "dynamic" and (a.kind, a.per_level) != (b.kind, b.per_level)) \
            or (a.kind == "dynamic" and b.kind == "linear"):
        raise ConfigError(f"{where} is a {b.kind} projector (per_level={b.per_level}, {b.in_dim}->{b.out_dim}); this "
                          f"stage asks for {a.kind} (per_level={a.per_level}, {a.in_dim}->{a.out_dim})")
    state, mine = saved.state_dict(), projector.state_dict()
    if a.kind == "dynamic":
        for k in list(state):
            if k.startswith("proj.shared."):
                for lv in a.levels:
                    state.setdefault(f"proj.{lv}." + k[len("proj.shared."):], state[k])
    projector.load_state_dict({k: state[k] if k in state and state[k].shape == v.shape else v for k, v in mine.items()})


def selfies_alignment(model, batch: dict, temperature: float) -> tuple[torch.Tensor, dict]:
    """InfoNCE between each sample's mean projected graph token and the mean frozen embedding of its input
    SELFIES, over the samples of this micro-batch that have molecules (fewer than 2: a zero loss)."""
    from graph.contrastive import contrastive_loss

    tokens, mols = model.last_graph
    cond = batch["cond"]
    n = cond["selfies_ids"].size(0)
    sample = cond["mol_sample"].to(tokens.device)[mols]
    keep = (torch.bincount(sample, minlength=n) > 0) & cond["selfies_mask"].any(1).to(tokens.device)
    if int(keep.sum()) < 2:
        return tokens.sum() * 0.0, {}
    g = torch.nn.functional.normalize(segment_mean(tokens, sample, n)[keep].float(), dim=-1)
    t = torch.nn.functional.normalize(model.pooled_embedding(cond["selfies_ids"], cond["selfies_mask"])[keep].float(), dim=-1)
    loss, acc = contrastive_loss(g, t, temperature)
    return loss, {"selfies_contrastive": loss.item(), **{f"selfies_{k}": v for k, v in acc.items()}}


def datasets(cfg: Config, tok, selfies_target: bool = False) -> TaskMix:
    """The stage's instruction data as the projector reads it (reduction, levels, cross-attention queries);
    a task-conditioned projector gets its task list (cfg.projector.tasks, else the tasks in the data)."""
    p = cfg.projector
    parts = [InstructionDataset(d, tok, reduction=p.reduction, levels=p.levels, prompt=cfg.prompt,
                                queries=layout_queries(dataclasses.asdict(p)), selfies_target=selfies_target)
             for d in cfg.data]
    if p.kind == "dynamic" and p.condition == "task":
        if not p.tasks:
            found = set().union(*(part.tasks_present() for part in parts))
            if None in found:
                raise ConfigError("projector.condition=task: some rows have no metadata.task; name the tasks "
                                  "(projector.tasks) or use condition=instruction")
            p.tasks = sorted(found)
        try:
            for part in parts:
                part.assign_tasks(p.tasks)
        except ValueError as e:
            raise ConfigError(f"projector.tasks: {e}") from None
    return TaskMix(parts)


@torch.no_grad()
def gate_report(model, data: TaskMix, limit: int = 4096, batch: int = 256) -> dict | None:
    """Mean level gates of a dynamic projector per task (data folder) and per metadata.question_type, over
    up to `limit` samples; collective under ZeRO-3 (every rank calls it with the same samples)."""
    from ..dataset.collator import condition_inputs

    if not getattr(model, "dynamic", False):
        return None
    levels = model.projector.cfg.levels
    sums: dict[str, dict[str, list]] = {"by_task": {}, "by_question_type": {}}
    idx = list(range(min(limit, len(data))))
    for s in range(0, len(idx), batch):
        items, keys = [], []
        for i in idx[s:s + batch]:
            part, j = data.locate(i)
            items.append({"cond_ids": part.cond_ids[j], "task": int(part.task_ids[j]), "graphs": [None]})
            k = part.index[j]
            keys.append((part.task_names[k] or os.path.basename(part.folder.rstrip("/")), part.question_types[k]))
        cond = condition_inputs(items)
        gates = torch.softmax(model.projector.gate_logits(model.condition(cond)).float(), -1).cpu()
        for (task, qt), g in zip(keys, gates):
            for group, key in (("by_task", task), ("by_question_type", qt)):
                if key is not None:
                    acc = sums[group].setdefault(key, [torch.zeros(len(levels)), 0])
                    acc[0] += g
                    acc[1] += 1
    out = {"levels": list(levels)}
    for group, d in sums.items():
        out[group] = {k: {lv: round(float(v), 4) for lv, v in zip(levels, t / n)} | {"samples": n}
                      for k, (t, n) in sorted(d.items())}
    return out


def run(cfg: Config, accelerator, run_dir: str, seed: int, stage: str, selfies_target: bool = False) -> dict:
    from accelerate.utils import send_to_device

    from ..dataset.collator import BatchPlan, Collator
    from ..models.llm import load_tokenizer

    out_dir = os.path.join(run_dir, stage)
    tok = load_tokenizer(cfg.llm.name, cfg.llm.trust_remote_code)
    data = datasets(cfg, tok, selfies_target)
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
        loss, logs = out.loss_sum / denominator, {"loss_sum": out.loss_sum.item()}
        if cfg.selfies_contrastive:
            aux, aux_logs = selfies_alignment(unwrapped, batch, cfg.contrastive_temperature)
            loss, logs = loss + cfg.selfies_contrastive * aux, {**logs, **aux_logs}
        if unwrapped.dynamic and unwrapped.projector.last_gates is not None:  # logged per step (TensorBoard, jsonl)
            logs.update({f"gate_{lv}": float(g) for lv, g in zip(unwrapped.projector.cfg.levels,
                                                                    unwrapped.projector.last_gates.float().mean(0))})
        return loss, {**logs, "samples": len(batch["spans"]), "tokens": batch["real_tokens"]}

    meta = {"llm": cfg.llm.name, "attn_implementation": cfg.llm.attn_implementation, "stage": stage,
            "prompt": dataclasses.asdict(cfg.prompt), "projector": dataclasses.asdict(cfg.projector),
            "lora": dataclasses.asdict(cfg.lora) if cfg.lora else None, "data": cfg.data, "seed": seed,
            "vocab_chunks": cfg.llm.vocab_chunks}  # a ZeRO-3 reload builds the same row blocks

    def snapshot(folder):  # every checkpoint carries an export: generation from a checkpoint, no unpickling
        save_export(unwrapped, tok, os.path.join(folder, "export"), meta, accelerator)

    metrics = train(accelerator, engine, opt, sched, loader, step, cfg.train, os.path.join(out_dir, "checkpoints"),
                    seed=seed, name=stage, count_fn=lambda bt: bt["label_tokens"], on_epoch=plan.set_epoch,
                    flops_per_token=fpt, peak_flops=cfg.peak_tflops * 1e12, snapshot=snapshot)
    frozen_same = fingerprint(unwrapped, trainable=False) == frozen_before
    trained_after = fingerprint(unwrapped, trainable=True)
    moved = sum(trained_after[k] != v for k, v in trained_before.items())
    flags = accelerator.gather(torch.tensor([float(frozen_same)], device=accelerator.device)).min()
    gates = gate_report(unwrapped, data)
    if gates:
        meta["gates"] = gates  # written into the export's m3mol_config.json
    export = save_export(unwrapped, tok, os.path.join(out_dir, "export"), meta, accelerator)
    checks = {"ranks_identical": ranks_identical(unwrapped, accelerator)}
    if cfg.verify_export:
        probe = send_to_device(collate([data[i] for i in range(min(3, len(data)))]), accelerator.device)
        checks["export_max_abs_logit_diff"], checks["export_reload"] = verify_export(
            unwrapped, probe, export, os.path.join(out_dir, "probe.safetensors"), accelerator)
    accelerator.free_memory(engine, opt)  # the next stage gets a fresh DeepSpeed engine
    return {**metrics, **inits, **checks, "export": export, "samples": len(data),
            "rejected_longer_than_max_length": sum(r["reason"] == "longer_than_max_length" for r in data.rejects),
            "rejected_no_molecule": sum(r["reason"] == "no_molecule" for r in data.rejects), "frozen_params_unchanged": bool(flags.item() == 1.0),
            "trained_tensors": len(trained_before), "trained_tensors_changed": int(moved), "flops_per_token": fpt,
            **({"gates": gates} if gates else {})}


def ranks_identical(model, accelerator) -> bool:
    """Every rank holds the same trained weights (gathered under ZeRO-3): a diverged rank is a bug."""
    from accelerate.utils import gather_object

    state = gathered_state(model, only_trainable=True)
    digest = hashlib.blake2b(b"".join(state[k].contiguous().view(torch.uint8).numpy().tobytes() for k in sorted(state)),
                             digest_size=16).hexdigest()
    digests = gather_object([digest]) if accelerator.num_processes > 1 else [digest]
    return len(set(digests)) == 1


@torch.no_grad()
def verify_export(model, probe: dict, export: str, path: str, accelerator) -> tuple[float, str]:
    """Logits of the trained model on a probe batch (every rank: ZeRO-3 forward is collective) against
    the export reloaded from disk with PEFT: under ZeRO-3 on every rank, partitioned like the training
    model (a model no rank can hold is never loaded whole), else on the main process. Returns (max abs
    logit difference, how it was reloaded). The probe and its logits are saved to `path`."""
    from safetensors.torch import save_file

    was_training = model.training
    model.eval()
    logits = model.logits(probe)
    model.train(was_training)
    diff, how = 0.0, "zero3_partitioned" if zero3_run() else "whole_on_main_process"
    if how == "zero3_partitioned":
        _, reloaded, _ = load_export(export, zero3=True)
        engine = zero3_inference_engine(reloaded, accelerator)
        mine = (reloaded.logits(probe) - logits).abs().max().float().reshape(1)
        diff = float(accelerator.gather(mine).max())  # every rank computed the whole probe
        accelerator.free_memory(engine)
        del engine, reloaded
    elif accelerator.is_main_process:
        _, reloaded, _ = load_export(export)
        diff = float((reloaded.logits(send_to_cpu(probe)) - logits.cpu()).abs().max())
    if accelerator.is_main_process:
        save_file({"logits": logits.cpu().contiguous(), "input_ids": probe["input_ids"].cpu().contiguous()}, path)
    accelerator.wait_for_everyone()
    return diff, how


def send_to_cpu(batch: dict) -> dict:
    from accelerate.utils import send_to_device

    return send_to_device(batch, "cpu")
