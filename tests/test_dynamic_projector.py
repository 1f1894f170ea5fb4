"""The dynamic level-fusion projector and the graph-SELFIES alignment stage (tiny random LLaMA, real data)."""
import itertools
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from test_llm_stages import _launch, _losses, _summary, _zero3_config
from trainer.dataset.collator import Collator
from trainer.dataset.instructions import SELFIES_INSTRUCTION, InstructionDataset, PromptConfig
from trainer.models.llm import GRAPH_TOKEN, load_llm
from trainer.models.multimodal_lm import MultimodalLM
from trainer.models.projector import LEVELS, GraphProjector, ProjectorConfig, graph_token_count, layout_queries

from graph.encoder import EncoderConfig, HierarchicalEncoder


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    from trainer.dataset.tasks import ROOT as REPO, SHIPPED, prepare

    out = str(tmp_path_factory.mktemp("inst"))
    return {t: prepare(t, os.path.join(REPO, SHIPPED[t][0]), out, limit=48) for t in ("molcap", "forward")}


@pytest.fixture(scope="module")
def tiny():
    return load_llm("tiny-random", attn_implementation="eager")


def _model(tok, lm, **proj):
    torch.manual_seed(0)
    enc = HierarchicalEncoder(EncoderConfig(num_layers=2, hidden=32))
    h = lm.config.hidden_size
    cfg = ProjectorConfig(in_dim=32, out_dim=h, cond_dim=h, **proj)
    return MultimodalLM(lm, enc, GraphProjector(cfg), tok.convert_tokens_to_ids(GRAPH_TOKEN)).eval()


LAYOUTS = [dict(kind="dynamic", fusion=f, condition=c, reduction=r, levels=list(lv), queries=3, tasks=["forward", "molcap"])
           for f, c, r, lv in itertools.product(("gate", "cross_attention"), ("instruction", "task"),
                                                ("none", "hierarchical", "all"), (LEVELS, ("node", "graph")))
           if not (f == "cross_attention" and r != "none")]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: f"{d['fusion']}-{d['condition']}-{d['reduction']}-{len(d['levels'])}")
def test_token_count_is_pure_and_gates_are_per_molecule_distributions(layout, data, tiny):
    tok, lm = tiny
    model = _model(tok, lm, **layout)
    ds = InstructionDataset(data["forward"], tok, reduction=layout["reduction"], levels=layout["levels"],
                            queries=layout_queries(layout), tasks=layout["tasks"])
    items = [ds[k] for k in range(4)]  # reactions: several molecules per sample
    for it in items:  # the count the collator packs on is a function of (atoms, motifs, settings) only
        want = sum(graph_token_count(int(g.num_atoms), int(g.num_motifs), layout["reduction"], layout["levels"],
                                     layout_queries(layout)) for g in it["graphs"])
        assert int((it["input_ids"] == ds.graph_id).sum()) == want
    batch = Collator(tok.pad_token_id, packed=True, budget=4096)(items)
    with torch.no_grad():
        model.embed(batch["input_ids"], batch["graphs"], batch["num_mols"], batch["cond"])  # raises on a count mismatch
    tokens, mols = model.last_graph
    g = model.projector.last_gates
    assert g.shape == (batch["num_mols"], len(layout["levels"]))
    assert torch.allclose(g.sum(1), torch.ones(len(g)))
    assert torch.allclose(g, torch.full_like(g, 1 / len(layout["levels"])))  # zero-initialised: uniform at start
    assert mols.tolist() == sorted(mols.tolist())  # grouped by molecule


def test_uniform_gates_reproduce_the_static_per_level_projector(data, tiny):
    tok, lm = tiny
    ds = InstructionDataset(data["forward"], tok, reduction="hierarchical")
    batch = Collator(tok.pad_token_id, packed=False)([ds[0], ds[1]])
    dyn = _model(tok, lm, kind="dynamic", reduction="hierarchical")
    static = _model(tok, lm, kind="mlp2", per_level=True, reduction="hierarchical")
    static.projector.proj.load_state_dict(dyn.projector.proj.state_dict())
    with torch.no_grad():
        a = dyn.embed(batch["input_ids"], batch["graphs"], batch["num_mols"], batch["cond"])
        b = static.embed(batch["input_ids"], batch["graphs"], batch["num_mols"])
    assert torch.allclose(a, b, atol=1e-6)


def test_gates_follow_the_instruction_and_the_task(data, tiny):
    tok, lm = tiny
    torch.manual_seed(1)
    for condition in ("instruction", "task"):
        model = _model(tok, lm, kind="dynamic", condition=condition, tasks=["forward", "molcap"])
        for p in model.projector.parameters():  # as after training: gate weights away from zero
            p.data.normal_(0, 0.5)
        a = InstructionDataset(data["forward"], tok, tasks=["forward", "molcap"])
        b = InstructionDataset(data["molcap"], tok, tasks=["forward", "molcap"])
        batch = Collator(tok.pad_token_id, packed=False)([a[0], b[0]])
        with torch.no_grad():
            model.embed(batch["input_ids"], batch["graphs"], batch["num_mols"], batch["cond"])
        g, ms = model.projector.last_gates, batch["cond"]["mol_sample"]
        assert not torch.allclose(g[ms == 0][0], g[ms == 1][0], atol=1e-3), condition
        assert torch.allclose(g[ms == 0], g[ms == 0][:1].expand_as(g[ms == 0]))  # one sample: one condition


def test_task_condition_needs_known_tasks(data, tiny):
    tok, _ = tiny
    with pytest.raises(ValueError, match="molcap"):
        InstructionDataset(data["molcap"], tok, tasks=["forward"])
    with pytest.raises(ValueError, match="task names"):
        ProjectorConfig(kind="dynamic", condition="task")


def test_selfies_target_rows_ask_for_the_selfies_from_graph_tokens_only(data, tiny):
    tok, _ = tiny
    with pytest.raises(ValueError, match="use_selfies"):
        InstructionDataset(data["forward"], tok, selfies_target=True)
    ds = InstructionDataset(data["molcap"], tok, prompt=PromptConfig(use_selfies=False), selfies_target=True)
    rec = ds.record(0)
    prompt = tok.decode(ds[0]["input_ids"][: ds[0]["num_prompt"]])
    answer = tok.decode(ds[0]["input_ids"][ds[0]["num_prompt"]:], skip_special_tokens=True)
    assert SELFIES_INSTRUCTION in prompt and rec["input"] not in prompt and GRAPH_TOKEN in prompt
    assert answer.strip() == rec["input"]


def _recipe(tmp, data, stages, **sections):
    import yaml

    common = {"llm": {"name": "tiny-random"}, "encoder": {"num_layers": 2, "hidden": 32},
              "batching": {"budget": 1024}, "prompt": {"max_length": 1024}}
    r = {"run_dir": str(tmp / "run"), "seed": 0, "log_with": "none", "stages": list(stages)}
    for stage in stages:
        r[stage] = {**common, "data": [data["molcap"], data["forward"]], **sections.get(stage, {})}
        r[stage]["prompt"] = {**common["prompt"], **sections.get(stage, {}).get("prompt", {})}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path)


ALIGN = {"train": {"max_steps": 4, "log_every": 1, "lr": 3e-3, "checkpoint_every": 2}, "prompt": {"use_selfies": False},
         "selfies_contrastive": 0.5}


@pytest.mark.slow
def test_align_selfies_resume_equals_an_uninterrupted_run(tmp_path, data):
    full = _summary(_launch(_recipe(tmp_path / "a", data, ["align_selfies"], align_selfies=ALIGN)))
    m = full["stages"]["align_selfies"]
    assert m["frozen_params_unchanged"] and m["trained_tensors_changed"] == m["trained_tensors"] == 4
    assert "selfies_contrastive" in m  # every row trained or accounted for (a long SELFIES answer may not fit)
    rows = sum(json.load(open(os.path.join(d, "manifest.json")))["accepted"] for d in data.values())
    assert m["samples"] + m["rejected_longer_than_max_length"] + m["rejected_no_molecule"] == rows and m["samples"] > 80
    recipe = _recipe(tmp_path / "b", data, ["align_selfies"], align_selfies=ALIGN)
    killed = _launch(recipe, env={"M3MOL_CRASH_AFTER_STEP": "2"})
    assert killed.returncode == 17
    resumed = _launch(recipe)
    assert "resumed from" in resumed.stdout + resumed.stderr
    _summary(resumed)
    a, b = (str(tmp_path / x / "run") for x in ("a", "b"))
    assert len(_losses(a, "align_selfies")) == 4
    assert _losses(b, "align_selfies") == pytest.approx(_losses(a, "align_selfies"), abs=1e-6)
    pa, pb = (load_file(os.path.join(d, "align_selfies", "export", "projector", "projector.safetensors")) for d in (a, b))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.slow
def test_dynamic_gates_learn_per_task_under_zero3_like_one_process(tmp_path, data):
    """align_selfies -> lora with a task-conditioned cross-attention projector: gates move apart per task, logged and
    exported; 2 ZeRO-3 ranks (everything partitioned) give the losses of one process with 2 accumulation steps."""
    dyn = {"kind": "dynamic", "fusion": "cross_attention", "condition": "task", "queries": 2}
    sections = {"align_selfies": {**ALIGN, "train": {"max_steps": 2, "log_every": 1, "lr": 3e-3}},
                "lora": {"projector": dyn, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                         "train": {"max_steps": 4, "log_every": 1, "lr": 5e-3}}}
    one = _summary(_launch(_recipe(tmp_path / "one", data, ["align_selfies", "lora"], **{
        **sections, "align_selfies": {**sections["align_selfies"], "train": {**sections["align_selfies"]["train"], "grad_accum": 2}},
        "lora": {**sections["lora"], "train": {**sections["lora"]["train"], "grad_accum": 2}}})))
    two = _summary(_launch(_recipe(tmp_path / "two", data, ["align_selfies", "lora"], **sections),
                           accel="cpu_2proc_zero3.yaml", ds_file=_zero3_config(tmp_path)))
    assert two["num_processes"] == 2
    for stage in ("align_selfies", "lora"):
        assert two["stages"][stage]["ranks_identical"] and two["stages"][stage]["frozen_params_unchanged"]
        assert two["stages"][stage]["export_max_abs_logit_diff"] <= 1e-5  # the export reloads the dynamic projector
        assert two["stages"][stage]["export_reload"] == "zero3_partitioned"
        assert _losses(str(tmp_path / "two" / "run"), stage) == pytest.approx(_losses(str(tmp_path / "one" / "run"), stage), abs=1e-4)
    lora = one["stages"]["lora"]
    assert lora["init_projector"].endswith(os.path.join("align_selfies", "export", "projector"))
    by_task = lora["gates"]["by_task"]
    assert set(by_task) == {"forward", "molcap"}
    fw, mc = ([by_task[t][lv] for lv in LEVELS] for t in ("forward", "molcap"))
    assert max(abs(x - y) for x, y in zip(fw, mc)) > 1e-3  # the two tasks' gates moved apart
    assert max(abs(x - 1 / 3) for x in fw + mc) > 1e-3  # and away from the uniform start
    with open(os.path.join(lora["export"], "m3mol_config.json")) as f:
        assert json.load(f)["gates"]["by_task"] == by_task
    with open(str(tmp_path / "one" / "run" / "lora" / "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert all(f"lora/gate_{lv}" in row for row in logged for lv in LEVELS)


def _level_data(n_mols: int, dim: int, gen: torch.Generator):
    """Encoder outputs with independent random features per level (molecules of 3-12 atoms, 1-4 motifs)."""
    from graph.encoder import EncoderOutput

    atoms = torch.randint(3, 13, (n_mols,), generator=gen)
    motifs = torch.randint(1, 5, (n_mols,), generator=gen)
    ids = torch.arange(n_mols)
    return EncoderOutput(torch.randn(int(atoms.sum()), dim, generator=gen), ids.repeat_interleave(atoms),
                         torch.randn(int(motifs.sum()), dim, generator=gen), ids.repeat_interleave(motifs),
                         torch.randn(n_mols, dim, generator=gen), ids)


@pytest.mark.parametrize("fusion,reduction", [("gate", "hierarchical"), ("cross_attention", "none")])
def test_gates_route_each_task_to_the_level_its_answer_needs(fusion, reduction):
    """Two tasks whose targets read different levels (task "nodes": a linear function of the molecule's mean
    atom features; task "whole": of its graph feature; every level independent noise for the other task).
    The projector's tokens are summed per molecule into a linear readout, so a level the task does not need
    only adds noise: after a short training each task's gates favour the level its target reads (the level
    neither needs may keep weight: a projection can silence it as well as its gate can)."""
    from trainer.models.projector import segment_mean

    torch.manual_seed(0)
    dim, out = 16, 8
    proj = GraphProjector(ProjectorConfig(in_dim=dim, out_dim=out, kind="dynamic", fusion=fusion, condition="task",
                                          tasks=["nodes", "whole"], reduction=reduction, queries=2))
    readout = torch.nn.Linear(out, 1)
    w = torch.randn(2, dim)
    opt = torch.optim.Adam([*proj.parameters(), *readout.parameters()], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        enc = _level_data(32, dim, gen)
        task = torch.arange(32) % 2
        source = torch.where(task[:, None] == 0, segment_mean(enc.node, enc.node_batch, 32), enc.graph)
        target = (source * w[task]).sum(1)
        toks, mols = proj(enc, 32, {"mol_task": task})
        pred = readout(segment_mean(toks, mols, 32) * torch.bincount(mols, minlength=32)[:, None]).squeeze(1)
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        gates = torch.softmax(proj.task_gates.weight, -1)  # [task, level] in LEVELS order
    node, graph = LEVELS.index("node"), LEVELS.index("graph")
    # each task weights its own level over the other task's by 2x, and more than the other task does
    assert gates[0, node] > 2 * gates[0, graph] and gates[1, graph] > 2 * gates[1, node], gates
    assert gates[0, node] > gates[1, node] + 0.15 and gates[1, graph] > gates[0, graph] + 0.15, gates
    assert loss.item() < 0.5 * target.var().item()  # the readout learnt the targets, it did not just move gates
