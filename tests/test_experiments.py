"""`python -m trainer.experiments`: a 2-cell grid on a tiny random LLaMA writes the table and the chart
from one shared stage-1 run, and a rerun skips the finished cells."""
import csv
import json
import os

import pytest
import yaml

from conftest import DATA, ROOT, cli


@pytest.fixture(scope="module")
def folders(tmp_path_factory, ray_local):
    from trainer.dataset.tasks import prepare

    out = str(tmp_path_factory.mktemp("exp_data"))
    return {"train": prepare("forward", os.path.join(DATA, "uspto50k", "train.csv"), out, "forward_train", limit=40),
            "test": prepare("forward", os.path.join(DATA, "uspto50k", "test.csv"), out, "forward_test", limit=3)}


def _recipe(tmp, folders):
    section = {"llm": {"name": "tiny-random"}, "encoder": {"num_layers": 2, "hidden": 32},
               "batching": {"budget": 1024}, "prompt": {"max_length": 1024}, "verify_export": False}
    r = {"out_dir": str(tmp / "exp"), "seed": 0, "tasks": ["forward"], "data": {"forward": folders},
         "grid": {"reductions": ["hierarchical"], "levels": [["node", "motif", "graph"]], "controls": ["selfies_only"]},
         "eval": {"limit": 3, "max_new_tokens": 6, "batch_size": 3},
         "align": {**section, "data": [folders["train"]], "train": {"max_steps": 2, "log_every": 1, "lr": 3e-3}},
         "lora": {**section, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                  "train": {"max_steps": 2, "log_every": 1, "lr": 3e-3}}}
    path = tmp / "experiments.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path)


@pytest.mark.slow
def test_two_cell_grid_table_chart_and_rerun_skips(tmp_path, folders):
    recipe = _recipe(tmp_path, folders)
    r = cli("trainer.experiments", "--config", recipe, timeout=900)
    assert r.returncode == 0, r.stderr[-5000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert (s["cells"], s["ran"], s["skipped"], s["failed"]) == (2, 2, 0, [])
    out = tmp_path / "exp"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(x["cell"], x["use_graph"], x["use_selfies"]) for x in rows] == [
        ("hierarchical/node+motif+graph", "True", "True"), ("selfies_only", "False", "True")]
    for x in rows:
        assert x["status"] == "done" and x["n_eval"] == "3" and x["steps"] == "2"
        assert 0.0 <= float(x["validity"]) <= 1.0 and float(x["exact_match"]) == 0.0  # an untrained model
    # both cells started from the one stage-1 projector and encoder; they differ in the graph side only
    recipes = [yaml.safe_load(open(out / "cells" / "forward" / d / "recipe.yaml"))["lora"]
               for d in ("hierarchical__node-motif-graph", "selfies_only")]
    assert recipes[0]["init_projector"] == recipes[1]["init_projector"] == str(out / "stage1" / "run" / "align" / "export" / "projector")
    assert recipes[0]["prompt"]["use_graph"] and not recipes[1]["prompt"]["use_graph"]
    assert recipes[0]["projector"]["reduction"] == "hierarchical"
    preds = [json.loads(line) for line in open(out / "cells" / "forward" / "selfies_only" / "preds.jsonl")]
    assert len(preds) == 3 and "<graph>" not in preds[0]["input"]
    md = (out / "results.md").read_text()
    assert "## forward" in md and "| hierarchical/node+motif+graph | done |" in md and "Scale:" in md
    leak = s["overlap"]["forward"]  # the held-out reactions checked against the training ones (shipped: none shared)
    assert leak["test_rows"] > 0 and leak["overlapping_rows"] == 0 and "Leak check" in md and "forward: 0 of" in md
    assert "beaten by" in md and "of 1 graph-token cells" in md
    png = (out / "forward.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    stamps = {p: os.path.getmtime(p) for p in out.glob("cells/forward/*/result.json")}
    # the rerun trains nothing: stage 1 is reused and both cells are skipped; the reports are rewritten
    again = cli("trainer.experiments", "--config", recipe, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    s2 = json.loads(again.stdout.strip().splitlines()[-1])
    assert (s2["ran"], s2["skipped"]) == (0, 2) and "stage 1 reused" in again.stderr
    assert stamps == {p: os.path.getmtime(p) for p in out.glob("cells/forward/*/result.json")}
    # in a smaller grid, new scoring settings re-score without retraining (a new training setting retrains
    # from scratch: test_changed_training_settings_never_resume_another_runs_checkpoint)
    cell = out / "cells" / "forward" / "hierarchical__node-motif-graph"
    ckpt, log = cell / "run" / "lora" / "checkpoints" / "step-2", cell / "run" / "lora" / "metrics.jsonl"
    trained, losses = os.path.getmtime(ckpt), log.read_text()
    fourth = cli("trainer.experiments", "--config", recipe, "grid.controls=[]", "eval.max_new_tokens=4", timeout=300)
    s4 = json.loads(fourth.stdout.strip().splitlines()[-1])
    assert fourth.returncode == 0 and (s4["cells"], s4["ran"], s4["skipped"]) == (1, 1, 0)
    assert os.path.getmtime(ckpt) == trained and log.read_text() == losses and "resumed from" in (cell / "train.log").read_text()


def test_changed_training_settings_never_resume_another_runs_checkpoint(tmp_path):
    from trainer.experiments import claim_run_dir

    run_dir = tmp_path / "run"
    recipe = {"run_dir": str(run_dir), "seed": 0, "lora": {"train": {"lr": 3e-3, "max_steps": 2}}}

    def checkpoint():
        (run_dir / "lora" / "checkpoints" / "step-2").mkdir(parents=True, exist_ok=True)
        return run_dir / "lora" / "checkpoints" / "step-2"

    assert not claim_run_dir(recipe, str(tmp_path / "cell"), None)  # a first run: nothing to keep
    ckpt = checkpoint()
    assert claim_run_dir(recipe, str(tmp_path / "cell"), None) and ckpt.exists()  # the same run resumes
    changed = {**recipe, "lora": {"train": {"lr": 1e-2, "max_steps": 2}}}
    assert not claim_run_dir(changed, str(tmp_path / "cell"), None) and not ckpt.exists()  # another run: from scratch
    ckpt = checkpoint()
    assert not claim_run_dir(changed, str(tmp_path / "cell"), "cpu_2proc.yaml") and not ckpt.exists()  # another launch too
    assert claim_run_dir(changed, str(tmp_path / "cell"), "cpu_2proc.yaml")


def test_bad_experiment_recipes_fail_before_training(tmp_path, folders):
    from trainer.config import ConfigError
    from trainer.experiments import cells, load_recipe, run

    recipe = _recipe(tmp_path, folders)
    for override, named in [("grid.reductions=[mean]", "grid.reductions"), ("grid.levels=[[atom]]", "grid.levels"),
                            ("grid.controls=[no_text]", "grid.controls"), ("tasks=[translation]", "tasks"),
                            ("lora.data=[x]", "lora.data"), ("data.forward={train: x}", "data.forward"),
                            ("eval.limt=3", "eval.limt")]:
        with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
            load_recipe(recipe, [override])
    with pytest.raises(ConfigError, match=r"lora\.batching\.mode"):  # a run recipe's own checks, before stage 1
        run(load_recipe(recipe, ["lora.batching.mode=stacked"]))
    assert not os.path.exists(tmp_path / "exp" / "stage1")
    grid = cells(load_recipe(recipe, ["grid.controls=[selfies_only,graph_only]"]).grid)
    assert [c["name"] for c in grid] == ["hierarchical/node+motif+graph", "selfies_only", "graph_only"]
    assert grid[2]["use_graph"] and not grid[2]["use_selfies"] and grid[2]["levels"] == ["node", "motif", "graph"]


def test_compare_lines_pick_the_best_cell_and_count_cells_above_selfies_only():
    from trainer.experiments import compare

    rows = [{"cell": "none/node", "metrics": {"exact_match": 0.1, "levenshtein": 5.0}},
            {"cell": "all/graph", "metrics": {"exact_match": 0.3, "levenshtein": 7.0}},
            {"cell": "graph_only", "metrics": {"exact_match": 0.5, "levenshtein": 9.0}},
            {"cell": "selfies_only", "metrics": {"exact_match": 0.2, "levenshtein": 6.0}},
            {"cell": "hierarchical/motif", "metrics": {}}]  # a failed cell has no metrics
    em, lev = compare(rows, ("exact_match", "levenshtein"))
    assert em.startswith("exact_match: best 0.5000 (graph_only)") and "beaten by 1 of 2 graph-token cells" in em
    assert lev.startswith("levenshtein: best 5.0000 (none/node)") and "beaten by 1 of 2" in lev  # lower is better


def test_dynamic_cells_and_the_gates_table_name_the_favoured_and_the_best_static_level():
    from trainer.experiments import Grid, cells, gates_section

    grid = Grid(reductions=["hierarchical"], levels=[["node"], ["motif"]], prompts=["both", "graph_only"],
                controls=["selfies_only"], dynamic=[{"name": "dyn", "fusion": "cross_attention", "prompt": "graph_only",
                                                     "aligned": True}])
    names = [c["name"] for c in cells(grid)]
    assert names == ["hierarchical/node", "hierarchical/motif", "graph_only/hierarchical/node",
                     "graph_only/hierarchical/motif", "selfies_only", "dyn"]
    dyn = cells(grid)[-1]
    assert dyn["projector"] == {"kind": "dynamic", "fusion": "cross_attention"} and dyn["aligned"] and not dyn["use_selfies"]

    def row(cell, acc, selfies, levels, gates=None):
        return {"cell": cell, "use_graph": True, "use_selfies": selfies, "dynamic": gates is not None, "levels": levels,
                "metrics": {"accuracy": acc}, **({"gates": gates} if gates else {})}

    gates = {"levels": ["node", "motif", "graph"],
             "by_task": {"grounding": {"node": 0.2, "motif": 0.5, "graph": 0.3, "samples": 10}},
             "by_question_type": {"has_ester": {"node": 0.1, "motif": 0.2, "graph": 0.7, "samples": 4},
                                  "count_rings": {"node": 0.6, "motif": 0.3, "graph": 0.1, "samples": 6}}}
    rows = [row("hierarchical/node", 0.9, True, "node"), row("graph_only/hierarchical/node", 0.4, False, "node"),
            row("graph_only/hierarchical/motif", 0.6, False, "motif"), row("dyn", 0.5, False, "node+motif+graph", gates)]
    text = "\n".join(gates_section("grounding", rows, "accuracy"))
    # graph-only dynamic cell: compared with the best graph-only static cell (motif, 0.6), not the SELFIES one
    assert "| dyn | 0.2000 | 0.5000 | 0.3000 | motif | graph_only/hierarchical/motif (0.6000) | motif |" in text
    assert "| has_ester | 0.1000 | 0.2000 | 0.7000 | graph |" in text and "| count_rings | 0.6000 | 0.3000 | 0.1000 | node |" in text
    assert gates_section("grounding", rows[:3], "accuracy") == []


def test_sigterm_stops_the_study_children(tmp_path):
    """A study stopped with SIGTERM (a scheduler's stop, `kill`) takes its children with it: the
    training / generation process group gets SIGTERM, so nothing runs on as an orphan. Real processes:
    a parent running the study's child helper, a child that starts its own grandchild and sleeps."""
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    child = f"import os, subprocess, time; g = subprocess.Popen(['sleep', '120']); " \
            f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{g.pid}}'); time.sleep(120)"
    parent = ("import sys; from trainer.experiments import run_child, sigterm_interrupts\n"
              "with sigterm_interrupts():\n"
              f"    run_child([sys.executable, '-c', {child!r}])\n")
    p = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2) and time.time() < deadline:
        time.sleep(0.2)
    kids = [int(x) for x in pids.read_text().split()]
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=30)[1]
    assert p.returncode != 0 and "KeyboardInterrupt" in err

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by init) counts as stopped
            return f.read().split()[2] != "Z"

    deadline = time.time() + 15
    while any(alive(k) for k in kids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(k) for k in kids), kids


def test_aligned_stage1_uses_the_encoder_and_llm_of_align(tmp_path):
    """align_selfies trains the projector that align then starts from, so in the aligned stage-1 run it
    inherits align's encoder (a pretrained one named by align.init_encoder) and LLM unless it names its
    own; before, the study trained align_selfies on a random encoder and align refused its projector."""
    from trainer.experiments import load_recipe, stage1_recipe

    recipe = os.path.join(ROOT, "launch_configs", "recipes", "experiments_grounding.yaml")
    folders = {"grounding": {"train": str(tmp_path / "train"), "test": str(tmp_path / "test")}}
    r = load_recipe(recipe, ["align.init_encoder=runs/enc", "align.encoder.hidden=32"])
    rec = stage1_recipe(r, folders, aligned=True)
    assert rec["stages"] == ["align_selfies", "align"]
    for k in ("init_encoder", "encoder", "llm"):
        assert rec["align_selfies"][k] == rec["align"][k]
    own = stage1_recipe(load_recipe(recipe, ["align.init_encoder=runs/enc", "align_selfies.init_encoder=runs/other"]),
                        folders, aligned=True)
    assert own["align_selfies"]["init_encoder"] == "runs/other"
    assert "align_selfies" not in stage1_recipe(r, folders)
