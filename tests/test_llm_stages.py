"""Stages 1 and 2 under real Accelerate + DeepSpeed ZeRO-2 / ZeRO-3 with 2 CPU ranks (tiny random LLaMA)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT
from trainer.stages.multimodal import fingerprint

ACCEL = os.path.join(ROOT, "launch_configs", "accelerate")


def _recipe(tmp, data, stages=("align", "lora"), **over):
    common = {"llm": {"name": "tiny-random"}, "encoder": {"num_layers": 2, "hidden": 32},
              "batching": {"budget": 1024}, "prompt": {"max_length": 1024}}
    r = {"run_dir": str(tmp / "run"), "seed": 0, "log_with": "none", "stages": list(stages)}
    if "align" in stages:
        r["align"] = {**common, "data": [data["molcap"]], "train": {"max_steps": 3, "log_every": 1, "lr": 3e-3}}
    if "lora" in stages:
        r["lora"] = {**common, "data": [data["forward"]], "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                     "train": {"max_steps": 4, "log_every": 1, "lr": 3e-3, "checkpoint_every": 2}}
    for k, v in over.items():
        stage, key = k.split("__")
        r[stage]["train"][key] = v
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path)


def _zero3_config(tmp):
    """ds_configs/zero3.json with the persistence thresholds at 0: tiny models are partitioned too."""
    with open(os.path.join(ROOT, "ds_configs", "zero3.json")) as f:
        cfg = json.load(f)
    cfg["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
    path = tmp / "zero3_test.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _launch(recipe, *extra, accel=None, ds_file=None, env=None, timeout=480):
    if accel is None:
        cmd = [sys.executable, "trainer/run.py", "--config", recipe, *extra]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ACCEL, accel)]
        cmd += ["--deepspeed_config_file", ds_file] if ds_file else []
        cmd += ["trainer/run.py", "--config", recipe, *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return r


def _summary(r):
    assert r.returncode == 0, r.stderr[-6000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _losses(run_dir, stage):
    with open(os.path.join(run_dir, stage, "metrics.jsonl")) as f:
        return [json.loads(line)[f"{stage}/loss"] for line in f]


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    from trainer.dataset.tasks import ROOT as REPO, SHIPPED, prepare

    out = str(tmp_path_factory.mktemp("inst"))  # the first 160 rows of each shipped sample
    return {t: prepare(t, os.path.join(REPO, SHIPPED[t][0]), out, limit=160) for t in ("molcap", "forward")}


@pytest.fixture(scope="module")
def single(tmp_path_factory, data):
    """The reference: one process, plain PyTorch, 2 accumulation steps = the 2-rank global batch."""
    tmp = tmp_path_factory.mktemp("single")
    s = _summary(_launch(_recipe(tmp, data, align__grad_accum=2, lora__grad_accum=2)))
    assert s["num_processes"] == 1
    return str(tmp / "run"), s


def _check_two_ranks(s, run_dir, single_dir):
    assert s["num_processes"] == 2 and s["distributed_type"] == "DistributedType.DEEPSPEED"
    for stage in ("align", "lora"):
        m = s["stages"][stage]
        assert m["frozen_params_unchanged"] and m["ranks_identical"]
        assert m["trained_tensors_changed"] == m["trained_tensors"] > 0  # the right ones trained
        assert _losses(run_dir, stage) == pytest.approx(_losses(single_dir, stage), abs=1e-5)
    assert s["stages"]["align"]["trained_tensors"] == 4  # the 2-layer MLP projector only
    assert s["stages"]["lora"]["trained_tensors"] > 4  # projector + LoRA A/B of every linear layer


@pytest.fixture(scope="module")
def zero2(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("zero2")
    return str(tmp / "run"), _summary(_launch(_recipe(tmp, data), accel="cpu_2proc_zero2.yaml"))


@pytest.mark.slow
def test_zero2_two_ranks_match_single_process(zero2, single):
    _check_two_ranks(zero2[1], zero2[0], single[0])


@pytest.mark.slow
def test_zero3_two_ranks_and_export_reloads_with_peft(tmp_path, data, single):
    from peft import PeftModel
    from safetensors.torch import load_file

    from trainer.models.export import load_export

    # with the vocabulary in 4 row blocks (trainer.models.vocab_chunks), partitioned like the rest: same losses as
    # the unchunked 1-process run, same FLOP count, and the export (a plain LLM + adapter) gives the same logits
    chunks = ("align.llm.vocab_chunks=4", "lora.llm.vocab_chunks=4")
    s = _summary(_launch(_recipe(tmp_path, data), *chunks, accel="cpu_2proc_zero3.yaml", ds_file=_zero3_config(tmp_path)))
    run_dir = str(tmp_path / "run")
    _check_two_ranks(s, run_dir, single[0])
    for stage in ("align", "lora"):
        assert s["stages"][stage]["flops_per_token"] == pytest.approx(single[1]["stages"][stage]["flops_per_token"])
        assert s["stages"][stage]["export_max_abs_logit_diff"] <= 1e-5
        assert s["stages"][stage]["export_reload"] == "zero3_partitioned"  # reloaded on every rank, never whole
    export = s["stages"]["lora"]["export"]
    # the adapter is a real PEFT folder with non-empty, trained tensors (a rank-0-only gather writes empty ones)
    adapter = load_file(os.path.join(export, "adapter", "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in adapter.items())
    tok, model, meta = load_export(export)
    assert isinstance(model.llm, PeftModel) and meta["stage"] == "lora"
    # the reloaded export reproduces the trained model's logits, computed inside the ZeRO-3 run
    probe = load_file(os.path.join(run_dir, "lora", "probe.safetensors"))
    from trainer.dataset.collator import Collator
    from trainer.dataset.instructions import InstructionDataset

    ds = InstructionDataset(data["forward"], tok, prompt=model_prompt(meta))
    batch = Collator(tok.pad_token_id, budget=1024)([ds[i] for i in range(3)])
    assert torch.equal(batch["input_ids"], probe["input_ids"])
    with torch.no_grad():
        assert (model.logits(batch) - probe["logits"]).abs().max() <= 1e-5
    # the encoder stays frozen across both stages
    enc1 = load_file(os.path.join(run_dir, "align", "export", "encoder", "model.safetensors"))
    enc2 = load_file(os.path.join(export, "encoder", "model.safetensors"))
    assert enc1.keys() == enc2.keys() and all(torch.equal(enc1[k], enc2[k]) for k in enc1)
    p1 = load_file(os.path.join(run_dir, "align", "export", "projector", "projector.safetensors"))
    p2 = load_file(os.path.join(export, "projector", "projector.safetensors"))
    assert any(not torch.equal(p1[k], p2[k]) for k in p1)  # stage 2 trained the projector further


def model_prompt(meta):
    from trainer.dataset.instructions import PromptConfig

    return PromptConfig(**meta["prompt"])


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path, data, zero2):
    """Stage 2 of the ZeRO-2 run again (from its stage-1 projector), killed right after its step-2
    checkpoint, then resumed: it must end where the uninterrupted run ended."""
    from safetensors.torch import load_file

    ref_dir, ref = zero2
    recipe = _recipe(tmp_path, data, stages=("lora",))
    args = [f"lora.init_projector={ref_dir}/align/export/projector", f"run_dir={tmp_path}/crash"]
    crashed = _launch(recipe, *args, accel="cpu_2proc_zero2.yaml", env={"M3MOL_CRASH_AFTER_STEP": "2"})
    assert crashed.returncode != 0
    assert os.path.isdir(tmp_path / "crash" / "lora" / "checkpoints" / "step-2")
    assert not os.path.exists(tmp_path / "crash" / "lora" / "export")
    # the killed run's stage folder resolves to its step-2 checkpoint, which generation loads (safetensors)
    from conftest import cli
    from trainer.models.export import resolve

    stage_dir = str(tmp_path / "crash" / "lora")
    assert resolve(stage_dir) == os.path.join(stage_dir, "checkpoints", "step-2", "export")
    g = cli("trainer.generate", "--model", stage_dir, "--data", data["forward"], "--out", str(tmp_path / "p.jsonl"),
            "--limit", "2", "--max-new-tokens", "4")
    assert g.returncode == 0 and json.loads(g.stdout.strip().splitlines()[-1])["predictions"] == 2, g.stderr[-3000:]
    step2 = load_file(os.path.join(resolve(stage_dir), "adapter", "adapter_model.safetensors"))
    resumed = _summary(_launch(recipe, *args, accel="cpu_2proc_zero2.yaml"))
    with open(tmp_path / "crash" / "lora" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]  # resumed at step 3, not restarted
    assert _losses(tmp_path / "crash", "lora") == pytest.approx(_losses(ref_dir, "lora"), abs=1e-6)
    a = load_file(os.path.join(ref["stages"]["lora"]["export"], "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(resumed["stages"]["lora"]["export"], "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the last checkpoint's export is the final model; the step-2 one is the model of step 2
    last = load_file(os.path.join(stage_dir, "checkpoints", "step-4", "export", "adapter", "adapter_model.safetensors"))
    assert all(torch.equal(last[k], b[k]) for k in b)
    assert step2.keys() == b.keys() and any(not torch.equal(step2[k], b[k]) for k in b)


@pytest.mark.slow
def test_two_nodes_over_loopback(tmp_path, data, single):
    """Two `accelerate launch` processes, one per "machine" (--num_machines 2), ZeRO-3 across them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proj = os.path.join(single[0], "align", "export", "projector")
    recipe = _recipe(tmp_path, data, stages=("lora",))
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ACCEL, "multi_node_cpu_zero3.yaml"), "--deepspeed_config_file", _zero3_config(tmp_path),
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "trainer/run.py", "--config", recipe, f"lora.init_projector={proj}", "lora.train.max_steps=2"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=480) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-4000:] + outs[1][1][-4000:]
    s = json.loads(outs[0][0].strip().splitlines()[-1])
    assert s["num_processes"] == 2 and s["distributed_type"] == "DistributedType.DEEPSPEED"
    assert s["stages"]["lora"]["steps"] == 2 and s["stages"]["lora"]["ranks_identical"]


def test_bad_recipes_fail_before_compute(tmp_path, data):
    from conftest import cli
    from trainer.config import ConfigError
    from trainer.run import load_run_config

    recipe = _recipe(tmp_path, data)
    r = cli("trainer.run", "--config", recipe, "lora.lora.rr=3", timeout=120)
    assert r.returncode == 2 and "lora.lora.rr" in r.stderr and "did you mean 'r'" in r.stderr
    cases = [("align.batching.mode=stacked", "align.batching.mode"), ("lora.data=[/nope]", "/nope"),
             ("align.prompt.max_length=4096", "budget"), ("align.lora={r: 4}", "align.lora"),
             ("lora.projector.levels=[atom]", "lora.projector.levels"), ("lora.lora.r=0", "lora.lora"),
             ("align.llm.vocab_chunks=-1", "align.llm.vocab_chunks"),
             ("lora.llm.attn_implementation=flashy", "lora.llm.attn_implementation"),
             ("mixed_precision=fp8", "mixed_precision"),
             ("lora.prompt.use_graph=false", None)]
    assert load_run_config(recipe, ["mixed_precision=no"]).mixed_precision == "no"  # YAML's false, as Accelerate writes it
    for override, named in cases:
        if named is None:  # a valid override changes only its own section (YAML aliases are not shared)
            cfg = load_run_config(recipe, [override])
            assert not cfg.stage_configs["lora"].prompt.use_graph and cfg.stage_configs["align"].prompt.use_graph
            continue
        with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
            load_run_config(recipe, [override])
    assert not os.path.exists(tmp_path / "run")


def test_fingerprint_sees_frozen_and_trained_changes():
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    m[0].requires_grad_(False)
    frozen, trained = fingerprint(m, False), fingerprint(m, True)
    assert set(frozen) == {"0.weight", "0.bias"} and set(trained) == {"1.weight", "1.bias"}
    with torch.no_grad():
        m[0].weight[0, 0] += 1e-7
    assert fingerprint(m, False) != frozen and fingerprint(m, True) == trained
