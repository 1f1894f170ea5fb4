"""The multimodal model: graph-token counts and splicing, packing without leaks, same modules on every rank."""
import csv
import itertools
import json
import os

import numpy as np
import pytest
import selfies
import torch
from rdkit import Chem

from conftest import DATA
from graph.encoder import EncoderConfig, HierarchicalEncoder
from graph.preprocess import run
from trainer.dataset.collator import IGNORE, Collator, plan_batches
from trainer.dataset.instructions import InstructionDataset, PromptConfig
from trainer.models.llm import GRAPH_TOKEN, load_llm
from trainer.models.multimodal_lm import MultimodalLM
from trainer.models.projector import LEVELS, REDUCTIONS, GraphProjector, ProjectorConfig, graph_token_count

LEVEL_SUBSETS = [list(c) for k in (1, 2, 3) for c in itertools.combinations(LEVELS, k)]


def _selfies(side: str) -> str:
    mols = [Chem.MolFromSmiles(s) for s in side.split(".")]
    for m in mols:
        for a in m.GetAtoms():
            a.SetAtomMapNum(0)
    return ".".join(selfies.encoder(Chem.MolToSmiles(m)) for m in mols)


@pytest.fixture(scope="module")
def inst(tmp_path_factory, ray_local):
    """Real rows: ChEBI-20 descriptions, USPTO-50K reactions (several reactants each), one prose row."""
    recs = []
    with open(os.path.join(DATA, "chebi20", "train.txt")) as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:13]
    recs += [{"instruction": "Describe this molecule.", "input": _selfies(s), "output": d} for _, s, d in rows]
    with open(os.path.join(DATA, "uspto50k", "train.csv")) as f:
        rxns = [r[2].split(">") for r in list(csv.reader(f))[1:40]]
    rxns = [r for r in rxns if "." in r[0]][:8]
    recs += [{"instruction": "Predict the product.", "input": _selfies(r[0]), "output": _selfies(r[2])} for r in rxns]
    recs.append({"instruction": "What is an aromatic ring?", "input": "", "output": "A planar ring of conjugated atoms."})
    tmp = tmp_path_factory.mktemp("inst")
    with open(tmp / "inst.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    m = run(str(tmp / "inst.jsonl"), str(tmp / "shards"), progress=False)
    assert m["accepted"] == len(recs)
    return str(tmp / "shards")


@pytest.fixture(scope="module")
def tiny():
    tok, lm = load_llm("tiny-random", attn_implementation="eager")
    return tok, lm


def _model(tok, lm, reduction="none", levels=LEVELS, per_level=False, seed=0):
    torch.manual_seed(seed)
    enc = HierarchicalEncoder(EncoderConfig(num_layers=2, hidden=32))
    proj = GraphProjector(ProjectorConfig(in_dim=32, out_dim=lm.config.hidden_size, reduction=reduction,
                                          levels=list(levels), per_level=per_level))
    return MultimodalLM(lm, enc, proj, tok.convert_tokens_to_ids(GRAPH_TOKEN)).eval()


def test_token_counts_and_splicing_for_every_mode_and_level_subset(inst, tiny):
    tok, lm = tiny
    for reduction, levels in itertools.product(REDUCTIONS, LEVEL_SUBSETS):
        ds = InstructionDataset(inst, tok, reduction=reduction, levels=levels)
        model = _model(tok, lm, reduction, levels, per_level=(reduction == "none"))
        for k in (0, 13, 20):  # a description, a reaction with several reactants, the prose row
            it = ds[k]
            counts = [graph_token_count(int(g.num_atoms), int(g.num_motifs), reduction, levels) for g in it["graphs"]]
            assert int((it["input_ids"] == ds.graph_id).sum()) == sum(counts)
            assert (k == 20) == (not counts) and (k != 13 or len(counts) >= 2)
            b = Collator(tok.pad_token_id, packed=False)([it])
            with torch.no_grad():
                x = model.embed(b["input_ids"], b["graphs"], b["num_mols"])[0]
                # expected: each molecule encoded alone, projected, reduced by hand
                want = []
                for g in it["graphs"]:
                    from torch_geometric.data import Batch
                    e = model.encoder(Batch.from_data_list([g]))
                    rows = {"node": e.node, "motif": e.motif, "graph": e.graph}
                    proj = [model.projector.proj[lv if model.projector.cfg.per_level else "shared"](rows[lv]) for lv in levels]
                    if reduction == "none":
                        want += proj
                    elif reduction == "hierarchical":
                        want += [p.mean(0, keepdim=True) for p in proj]
                    else:
                        want.append(torch.cat(proj).mean(0, keepdim=True))
            pos = b["input_ids"][0] == ds.graph_id
            if want:
                torch.testing.assert_close(x[pos], torch.cat(want), atol=1e-5, rtol=1e-5)
            text = model.decoder.get_input_embeddings()(b["input_ids"][0][~pos])
            torch.testing.assert_close(x[~pos], text)  # text positions untouched


def test_targets_mask_prompt_graph_and_first_label(inst, tiny):
    tok, _ = tiny
    ds = InstructionDataset(inst, tok)
    items = [ds[k] for k in (0, 13, 20, 3)]
    b = Collator(tok.pad_token_id, budget=4096)(items)
    assert b["input_ids"].shape[0] == 1 and len(b["spans"]) == 4
    tgt, ids, pos = b["targets"][0], b["input_ids"][0], b["position_ids"][0]
    for (_, at, n, k), it in zip(b["spans"], items):
        p = it["num_prompt"]
        assert pos[at] == 0 and pos[at + n - 1] == n - 1  # positions restart per sample
        assert (tgt[at:at + p - 1] == IGNORE).all()  # prompt and graph positions never learned
        assert torch.equal(tgt[at + p - 1:at + n - 1], ids[at + p:at + n])  # the answer (+ end token)
        assert tgt[at + n - 1] == IGNORE  # the next sample's first token is not predicted from this one
        assert ids[at + n - 1] == tok.eos_token_id
    assert b["label_tokens"] == sum(len(it["input_ids"]) - it["num_prompt"] for it in items)
    assert not torch.isin(tgt, torch.tensor([ds.graph_id])).any()  # graph tokens are never targets


@pytest.mark.parametrize("attn", ["eager", "sdpa", "sdpa_varlen"])
def test_packed_batch_equals_each_sample_alone(inst, attn):
    tok, lm = load_llm("tiny-random", attn_implementation=attn)
    model = _model(tok, lm)
    ds = InstructionDataset(inst, tok)
    plan = plan_batches(ds.lengths, "packed", seed=0, epoch=0, budget=1536, rows=2)
    packed = Collator(tok.pad_token_id, budget=1536)
    single = Collator(tok.pad_token_id, packed=False)
    batch = next(p for p in plan if len(p) >= 5)  # several samples per row, two rows
    b = packed([ds[k] for k in batch])
    assert b["input_ids"].shape[0] == 2
    with torch.no_grad():
        logits, out = model.logits(b), model(b)
        total, worst = 0.0, 0.0
        for r, at, n, k in b["spans"]:
            alone = single([ds[k]])
            worst = max(worst, (model.logits(alone)[0, :n] - logits[r, at:at + n]).abs().max().item())
            total += model(alone).loss_sum.item()
    assert worst <= 1e-4
    assert out.loss_sum.item() == pytest.approx(total, rel=1e-5)


def test_same_modules_and_parameters_with_and_without_molecules(inst, tiny):
    """A rank whose batch has no molecule must still call the encoder and projector (DDP / ZeRO-3)."""
    tok, lm = tiny
    ds = InstructionDataset(inst, tok)
    model = _model(tok, lm, per_level=True).train()
    model.projector.requires_grad_(True)
    called = set()
    hooks = [m.register_forward_hook(lambda mod, i, o, name=n: called.add(name)) for n, m in model.named_modules()]
    seen = []
    for k in (0, 20):  # molecules / prose only
        called.clear()
        model.zero_grad(set_to_none=True)
        b = Collator(tok.pad_token_id)([ds[k]])
        assert (b["graphs"] is None) == (k == 20)
        out = model(b)
        (out.loss_sum / out.num_tokens).backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        seen.append((set(called), grads))
    for h in hooks:
        h.remove()
    assert seen[0] == seen[1]
    assert any(n.startswith("encoder.") for n in seen[0][0]) and any(n.startswith("projector.proj.") for n in seen[0][1])


def test_frozen_encoder_stays_in_eval_mode(tiny, inst):
    tok, lm = tiny
    model = _model(tok, lm).train()
    assert not model.encoder.training and model.llm.training
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    ds = InstructionDataset(inst, tok)
    model(Collator(tok.pad_token_id)([ds[0], ds[1]]))
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())  # BN stats too


def test_prompt_controls_and_long_samples_are_recorded(inst, tiny):
    tok, _ = tiny
    full = InstructionDataset(inst, tok)
    no_graph = InstructionDataset(inst, tok, prompt=PromptConfig(use_graph=False))
    no_selfies = InstructionDataset(inst, tok, prompt=PromptConfig(use_selfies=False))
    gid = full.graph_id
    assert not any((x == gid).any() for x in no_graph.ids) and no_graph[0]["graphs"] == []
    rec = full.record(0)
    assert rec["input"] in tok.decode(full[0]["input_ids"]) and rec["input"] not in tok.decode(no_selfies[0]["input_ids"])
    assert (no_selfies[0]["input_ids"] == gid).sum() == (full[0]["input_ids"] == gid).sum()
    assert "aromatic ring" in tok.decode(no_selfies[20]["input_ids"])  # prose input kept without molecules
    cut = int(np.median(full.lengths))
    short = InstructionDataset(inst, tok, prompt=PromptConfig(max_length=cut))
    assert len(short) + len(short.rejects) == len(full)
    assert short.rejects and all(r["length"] > cut and r["reason"] == "longer_than_max_length" for r in short.rejects)
    assert sorted(short.row_ids.tolist() + [r["row"] for r in short.rejects]) == sorted(full.row_ids.tolist())


@pytest.mark.parametrize("mode", ["packed", "padded", "grouped"])
def test_batch_plans_cover_every_sample_once(mode):
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 900, size=500)
    plans = [plan_batches(lengths, mode, seed=3, epoch=e, budget=2048, rows=2, window=128, batch_size=8) for e in (0, 0, 1)]
    assert plans[0] == plans[1] and plans[0] != plans[2]  # deterministic per (seed, epoch), reshuffled per epoch
    for plan in plans:
        assert sorted(i for b in plan for i in b) == list(range(500))
    if mode == "packed":  # each micro-batch: rows of at most `budget` tokens, laid out by the collator
        col = Collator(0, budget=2048)
        for b in plans[0]:
            rows = col.rows([int(lengths[i]) for i in b])
            assert len(rows) <= 2 and all(sum(int(lengths[b[k]]) for k in r) <= 2048 for r in rows)
        eff = lengths.sum() / (2048 * sum(len(col.rows([int(lengths[i]) for i in b])) for b in plans[0]))
        assert eff > 0.95
    with pytest.raises(ValueError, match="budget"):
        plan_batches(np.array([10, 3000]), "packed", 0, 0, budget=2048)


def test_projector_save_load_round_trip(tmp_path):
    p = GraphProjector(ProjectorConfig(in_dim=8, out_dim=16, kind="linear", per_level=True, levels=["graph", "node"]))
    p.save_pretrained(str(tmp_path))
    q = GraphProjector.from_pretrained(str(tmp_path))
    assert q.cfg == p.cfg and q.cfg.levels == ["node", "graph"]
    assert all(torch.equal(a, b) for a, b in zip(p.state_dict().values(), q.state_dict().values()))
    with pytest.raises(ValueError, match="levels"):
        ProjectorConfig(levels=["atom"])
