"""Generation with graph tokens: greedy equals a step-by-step argmax decode, beam 1 equals greedy, the CLI
writes predictions in input order that the evaluate CLI reads."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import DATA, cli
from graph.encoder import EncoderConfig, HierarchicalEncoder
from trainer.dataset.collator import Collator
from trainer.generate import generate, shared_prefix
from trainer.dataset.instructions import InstructionDataset
from trainer.models.llm import GRAPH_TOKEN, load_llm
from trainer.models.multimodal_lm import MultimodalLM
from trainer.models.projector import GraphProjector, ProjectorConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_local):
    from accelerate import Accelerator

    from trainer.models.export import save_export
    from trainer.dataset.tasks import prepare

    tmp = tmp_path_factory.mktemp("gen")
    folder = prepare("forward", os.path.join(DATA, "uspto50k", "test.csv"), str(tmp), limit=12)
    tok, lm = load_llm("tiny-random", attn_implementation="sdpa")
    torch.manual_seed(0)
    enc = HierarchicalEncoder(EncoderConfig(num_layers=2, hidden=32))
    model = MultimodalLM(lm, enc, GraphProjector(ProjectorConfig(in_dim=32, out_dim=lm.config.hidden_size)),
                         tok.convert_tokens_to_ids(GRAPH_TOKEN)).eval()
    from trainer.dataset.instructions import PromptConfig
    import dataclasses

    meta = {"llm": "tiny-random", "attn_implementation": "sdpa", "stage": "align",
            "prompt": dataclasses.asdict(PromptConfig()), "projector": {}, "lora": None}
    export = save_export(model, tok, str(tmp / "export"), meta, Accelerator(cpu=True))
    return tok, model, InstructionDataset(folder, tok), export, folder


def _loud(model, seed: int):
    """A copy whose LLM weights are drawn large: the tiny random model answers "\n" to everything, this one
    gives each row its own answer, so equal answers mean something."""
    import copy

    loud = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in loud.llm.parameters():
            p.normal_(0, 0.5)
    return loud


def _argmax_decode(model, tok, item, n):
    ids = list(item["input_ids"][: item["num_prompt"]])
    col = Collator(tok.pad_token_id, packed=False)
    for _ in range(n):
        b = col([{**item, "input_ids": np.asarray(ids), "num_prompt": len(ids)}])
        with torch.no_grad():
            nxt = int(model.logits(b)[0, len(ids) - 1].argmax())
        ids.append(nxt)
        if nxt == tok.eos_token_id:
            break
    return tok.decode(ids[item["num_prompt"]:], skip_special_tokens=True).strip()


def test_greedy_batch_equals_stepwise_argmax_and_beam_one(setup):
    tok, model, ds, _, _ = setup
    items = [ds[k] for k in (0, 3, 7)]  # different prompt lengths: left padding in one batch
    assert len({it["num_prompt"] for it in items}) > 1
    greedy = generate(model, tok, items, max_new_tokens=12)
    assert greedy == generate(model, tok, items, max_new_tokens=12)  # deterministic
    assert greedy == generate(model, tok, items, max_new_tokens=12, num_beams=1)
    assert greedy == [_argmax_decode(model, tok, it, 12) for it in items]
    # the model comes back as it was: training kernel and mode (generation itself runs on plain sdpa)
    model._base().set_attn_implementation("sdpa_varlen")
    model.train()
    try:
        assert generate(model, tok, items, max_new_tokens=12) == greedy
        assert model._base().config._attn_implementation == "sdpa_varlen" and model.training
    finally:
        model._base().set_attn_implementation("sdpa")
        model.eval()


def test_shared_prefix_stops_short_of_the_last_token_and_graph_placeholders():
    rows = [torch.tensor(x) for x in ([1, 2, 3, 4], [1, 2, 3, 6, 7], [1, 2, 3])]
    assert shared_prefix(rows, stop=99) == 2  # the shortest row keeps its last token for the first logits
    assert shared_prefix(rows, stop=2) == 1  # a graph placeholder is never cached: its embedding is per row
    assert shared_prefix(rows + [torch.tensor([5, 2, 3, 4])], stop=99) == 0
    assert shared_prefix([torch.tensor([1, 2, 9, 4]), torch.tensor([1, 2, 3, 4])], stop=99) == 2


def test_shared_prefix_run_once_gives_the_answers_of_a_full_prefill(setup):
    """Greedy rows share the chat template's system turn: it runs once and each row continues from a copy of
    its KV cache, laid out [prefix | padding | rest]. The answers equal a full left-padded prefill of each row
    and a step-by-step argmax decode, on weights drawn large so that answers differ from row to row."""
    tok, model, ds, _, _ = setup
    items = [ds[k] for k in (0, 3, 7, 9)]
    prompts = [torch.as_tensor(it["input_ids"][: it["num_prompt"]]) for it in items]
    pre = shared_prefix(prompts, model.graph_token_id)
    assert 0 < pre < min(len(p) for p in prompts) and len({len(p) for p in prompts}) > 1
    loud = _loud(model, seed=1)
    cached = generate(loud, tok, items, max_new_tokens=10)
    assert len(set(cached)) == len(items) and all(cached)
    assert cached == generate(loud, tok, items, max_new_tokens=10, prefix_cache=False)
    assert cached == [_argmax_decode(loud, tok, it, 10) for it in items]


def test_cli_writes_ordered_predictions_that_evaluate_reads(setup, tmp_path):
    _, _, ds, export, folder = setup
    out = tmp_path / "preds.jsonl"
    r = cli("trainer.generate", "--model", export, "--data", folder, "--out", str(out), "--tsv", str(tmp_path / "p.txt"),
            "--batch-size", "5", "--max-new-tokens", "8", "--mixed-precision", "bf16", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["mixed_precision"] == "bf16"
    rows = [json.loads(line) for line in open(out)]
    assert [x["row"] for x in rows] == ds.row_ids.tolist()  # every sample, input order
    assert all(x["target"] == ds.record(k)["output"] for k, x in enumerate(rows))
    # each record's metadata (JSON text in the shards) comes through as a dict: the grounding task reads it
    assert all(x["metadata"] == json.loads(ds.record(k)["metadata"]) for k, x in enumerate(rows))
    assert {x["metadata"]["task"] for x in rows} == {"forward"}
    ev = cli("trainer.evaluate", "--task", "forward", "--predictions", str(out), timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    metrics = json.loads(ev.stdout.strip().splitlines()[-1])
    assert 0 <= metrics["validity"] <= 1 and metrics["exact_match"] == 0.0  # an untrained model
    bad = cli("trainer.generate", "--model", str(tmp_path / "nope"), "--data", folder, "--out", str(out))
    assert bad.returncode == 2 and "not found" in bad.stderr


def test_dataset_for_follows_the_exported_projector(setup):
    """An export trained with reduced graph tokens gets prompts with that many placeholders."""
    from trainer.models.export import dataset_for
    from trainer.models.projector import graph_token_count

    tok, _, ds, _, folder = setup
    meta = {"prompt": {}, "projector": {"reduction": "hierarchical", "levels": ["node", "graph"]}}
    reduced = dataset_for(meta, folder, tok)
    gid = tok.convert_tokens_to_ids(GRAPH_TOKEN)
    for k in range(3):
        full, red = ds[k], reduced[k]
        assert int((np.asarray(red["input_ids"]) == gid).sum()) == sum(graph_token_count(
            int(g.num_atoms), int(g.num_motifs), "hierarchical", ["node", "graph"]) for g in red["graphs"]) == 2 * len(red["graphs"])
        assert int((np.asarray(full["input_ids"]) == gid).sum()) > int((np.asarray(red["input_ids"]) == gid).sum())


@pytest.mark.slow
def test_two_processes_split_rows_and_gather_them_in_order(setup, tmp_path):
    """`accelerate launch` on 2 CPU ranks: each generates a contiguous slice, rank 0 writes all rows in
    input order, with the same answers as one process."""
    import subprocess
    import sys

    from conftest import ROOT

    _, _, ds, export, folder = setup
    args = ["-m", "trainer.generate", "--model", export, "--data", folder, "--batch-size", "3", "--max-new-tokens", "6",
            "--limit", "7"]  # 7 rows: slices of 4 and 3
    one = cli(*args[1:], "--out", str(tmp_path / "one.jsonl"), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "launch_configs", "accelerate", "cpu_2proc.yaml"), *args, "--out", str(tmp_path / "two.jsonl")]
    two = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "num_processes" in two.stdout and json.loads(two.stdout.strip().splitlines()[-1])["num_processes"] == 2
    a = [json.loads(line) for line in open(tmp_path / "one.jsonl")]
    b = [json.loads(line) for line in open(tmp_path / "two.jsonl")]
    assert [x["row"] for x in b] == [x["row"] for x in a] == ds.row_ids.tolist()[:7]
    assert [x["prediction"] for x in b] == [x["prediction"] for x in a]


@pytest.mark.slow
def test_zero3_ranks_generate_from_partitions_with_the_answers_of_one_whole_model(setup, tmp_path):
    """`accelerate launch` under DeepSpeed ZeRO-3 on 2 CPU ranks: each rank builds half of every LLM tensor
    from the export's safetensors (no rank holds the model whole), uneven slices (7 rows in batches of 3:
    4 rows in 2 batches, 3 rows in 1 batch run again for the lockstep, its answers dropped), and the answers
    equal one process with the whole model. Weights drawn large, so answers differ from row to row."""
    import subprocess
    import sys

    from accelerate import Accelerator

    from conftest import ROOT
    from test_llm_stages import _zero3_config
    from trainer.models.export import save_export

    tok, model, ds, _, folder = setup
    loud = _loud(model, seed=2)
    llm_dir = tmp_path / "loud_llm"  # the export names its base LLM by folder, read back from these files
    loud.llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    meta = {"llm": str(llm_dir), "attn_implementation": "sdpa", "stage": "align", "prompt": {}, "projector": {}, "lora": None}
    export = save_export(loud, tok, str(tmp_path / "export"), meta, Accelerator(cpu=True))
    args = ["-m", "trainer.generate", "--model", export, "--data", folder, "--batch-size", "3", "--max-new-tokens", "8",
            "--limit", "7"]
    one = cli(*args[1:], "--out", str(tmp_path / "one.jsonl"), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads(one.stdout.strip().splitlines()[-1])["model_on_each_rank"] == "whole"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "launch_configs", "accelerate", "cpu_2proc_zero3.yaml"),
           "--deepspeed_config_file", _zero3_config(tmp_path), *args, "--out", str(tmp_path / "two.jsonl")]
    two = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert two.returncode == 0, "\n".join(l for l in two.stderr.splitlines() if "Error" in l or "error" in l)[-3000:]
    summary = json.loads(two.stdout.strip().splitlines()[-1])
    assert summary["num_processes"] == 2 and summary["model_on_each_rank"] == "zero3_partition"
    assert 0.5 <= summary["llm_share_per_rank"] < 0.51  # half of every tensor (rounded up), on each rank
    a = [json.loads(line) for line in open(tmp_path / "one.jsonl")]
    b = [json.loads(line) for line in open(tmp_path / "two.jsonl")]
    assert [x["row"] for x in b] == [x["row"] for x in a] == ds.row_ids.tolist()[:7]
    assert len({x["prediction"] for x in a}) > 3
    assert [x["prediction"] for x in b] == [x["prediction"] for x in a]


def test_bf16_autocast_generation_agrees_with_fp32(setup):
    """`--mixed-precision bf16` (CPU autocast): fp32 token embeddings, bf16 graph tokens and a bf16 KV cache meet
    in one prefill and the shared-prefix copy; on weights drawn large the answers are those of fp32."""
    tok, model, ds, _, _ = setup
    items = [ds[k] for k in (0, 3, 7, 9)]
    loud = _loud(model, seed=1)
    ref = generate(loud, tok, items, max_new_tokens=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = generate(loud, tok, items, max_new_tokens=3)
        full = generate(loud, tok, items, max_new_tokens=3, prefix_cache=False)
    assert cached == full
    assert sum(a == b for a, b in zip(cached, ref)) >= 3, (cached, ref)
