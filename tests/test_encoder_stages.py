"""Stages 0a and 0b through the real entry point: config errors, 2-process DDP runs, crash and resume."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, ROOT, cli
from graph.preprocess import run as preprocess

ACCEL_CFG = os.path.join(ROOT, "launch_configs", "accelerate", "cpu_2proc.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("shards")
    preprocess(os.path.join(DATA, "chebi20", "train.txt"), str(out / "train"), chunk_size=100, progress=False)
    preprocess(os.path.join(DATA, "chebi20", "test.txt"), str(out / "test"), chunk_size=100, progress=False)
    return out


def recipe(tmp_path, shards, stages, **extra) -> str:
    import yaml

    cfg = {"run_dir": str(tmp_path / "run"), "stages": stages, "log_with": "none"}
    if "encoder_ssl" in stages:
        cfg["encoder_ssl"] = {"data": [str(shards / "train")], "encoder": {"num_layers": 2, "hidden": 32},
                              "train": {"batch_size": 16, "max_steps": 6, "log_every": 1, "checkpoint_every": 3}}
    if "encoder_contrastive" in stages:
        cfg["encoder_contrastive"] = {"data": str(shards / "train"), "val_data": str(shards / "test"),
                                      "encoder": {"num_layers": 2, "hidden": 32},
                                      "contrastive": {"freeze_text": True, "max_length": 64},
                                      "train": {"batch_size": 16, "max_steps": 4, "log_every": 1}}
    cfg.update(extra)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def launch(recipe_path, *overrides, nproc=2, env=None, timeout=600):
    import subprocess
    import sys

    if nproc == 1:
        cmd = [sys.executable, "trainer/run.py", "--config", recipe_path, *overrides]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCEL_CFG,
               "trainer/run.py", "--config", recipe_path, *overrides]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    return r


def test_bad_recipe_fails_before_compute(tmp_path, shards):
    path = recipe(tmp_path, shards, ["encoder_ssl"])
    r = cli("trainer.run", "--config", path, "encoder_ssl.train.lrr=0.1")
    assert r.returncode == 2 and "encoder_ssl.train.lrr" in r.stderr and "did you mean 'lr'" in r.stderr
    from trainer.config import ConfigError
    from trainer.run import load_run_config

    # the CLI turns a ConfigError into exit 2 (above); the other checks need no process of their own
    with pytest.raises(ConfigError, match="/nope.*not found|not found.*/nope"):
        load_run_config(path, ["encoder_ssl.data=[/nope]"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_run_config(path, ["stages=[encoder_sssl]"])
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_two_process_ssl_and_contrastive(tmp_path, shards):
    r = launch(recipe(tmp_path, shards, ["encoder_ssl", "encoder_contrastive"]))
    assert r.returncode == 0, r.stderr[-8000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["num_processes"] == 2 and s["distributed_type"] == "DistributedType.MULTI_CPU"
    ssl, con = s["stages"]["encoder_ssl"], s["stages"]["encoder_contrastive"]
    assert ssl["steps"] == 6 and con["steps"] == 4
    assert con["init_encoder"].endswith("encoder_ssl/encoder")  # 0b continued from 0a
    for k in ("eval_atom_type_acc", "eval_bond_type_acc", "eval_link_acc", "eval_count_mae"):
        assert k in ssl
    for k in ("eval_g2t_top1", "eval_g2t_top10", "eval_t2g_top1", "eval_t2g_top10"):
        assert 0.0 <= con[k] <= 1.0
    assert con["eval_retrieval_pool"] == 64
    # both ranks hold identical weights after training (DDP really synchronised them): compare the
    # model shards each rank saved in its last checkpoint
    ck = os.path.join(tmp_path, "run", "encoder_ssl", "checkpoints", "step-6")
    w = load_file(os.path.join(ck, "model.safetensors"))
    saved = load_file(os.path.join(tmp_path, "run", "encoder_ssl", "encoder", "model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(w["encoder." + k], v)


@pytest.mark.slow
def test_crash_and_resume_equals_uninterrupted(tmp_path, shards):
    path = recipe(tmp_path, shards, ["encoder_ssl"])
    whole = str(tmp_path / "whole")
    r = launch(path, f"run_dir={whole}", nproc=1)
    assert r.returncode == 0, r.stderr[-8000:]
    crashed = str(tmp_path / "crashed")
    r = launch(path, f"run_dir={crashed}", nproc=1, env={"M3MOL_CRASH_AFTER_STEP": "3"})
    assert r.returncode == 17
    assert os.path.isdir(os.path.join(crashed, "encoder_ssl", "checkpoints", "step-3"))
    assert not os.path.exists(os.path.join(crashed, "encoder_ssl", "encoder"))
    r = launch(path, f"run_dir={crashed}", nproc=1)
    assert r.returncode == 0, r.stderr[-8000:]
    assert "resumed from" in r.stdout + r.stderr
    a = load_file(os.path.join(whole, "encoder_ssl", "encoder", "model.safetensors"))
    b = load_file(os.path.join(crashed, "encoder_ssl", "encoder", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_two_node_launch_over_loopback(tmp_path, shards):
    """Two `accelerate launch` processes, --num_machines 2, machine ranks 0 and 1, over loopback."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = recipe(tmp_path, shards, ["encoder_ssl"])
    cfg = os.path.join(ROOT, "launch_configs", "accelerate", "multi_node_cpu.yaml")
    procs = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg,
                               "--machine_rank", str(rank), "--main_process_port", str(port),
                               "trainer/run.py", "--config", path], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    s = json.loads(outs[0][0].strip().splitlines()[-1])  # machine 0 holds global rank 0
    assert s["num_processes"] == 2 and s["distributed_type"] == "DistributedType.MULTI_CPU"
    assert s["stages"]["encoder_ssl"]["steps"] == 6
    assert not [ln for ln in outs[1][0].splitlines() if ln.startswith("{")]  # only global rank 0 prints the summary


def test_cached_text_embeddings_match_direct_encoding(shards):
    """Length-sorted batched caching puts every embedding back at its own text's index."""
    from graph.contrastive import TextEncoder
    from graph.dataset import ShardDataset
    from trainer.stages.encoder_contrastive import PairDataset

    ds = PairDataset(ShardDataset(str(shards / "test")), list(range(40)))
    text = TextEncoder(None, max_length=64, freeze=True)
    ds.cache_text(text, batch_size=16)
    direct = torch.cat([text.encode([t]) for t in ds.texts[:40:7]])
    torch.testing.assert_close(ds.text_emb[:40:7], direct, rtol=1e-4, atol=1e-4)
    assert ds[3].text_emb.shape == (1, text.dim) and ds[3].text == ds.texts[3]
