"""The paper's study as one command: `python -m trainer.experiments --config RECIPE.yaml [key=value ...]`.

Which graph level and which token reduction help which task, and how much the model leans on SELFIES:

    cells  = reductions x levels (graph tokens and SELFIES in the prompt)
           [x prompts: `graph_only` repeats every static cell without SELFIES, e.g. graph_only/none/node]
           + selfies_only (no graph tokens: prompt.use_graph=false)
           + graph_only   (graph tokens, no SELFIES: prompt.use_selfies=false; control_projector's layout)
           + dynamic      (projector.kind=dynamic cells, trainer/models/projector.py; `aligned: true` ones start from a
                           stage-1 run that first ran the align_selfies stage)
    for each task: every cell trains stage 2 (LoRA) from ONE stage-1 checkpoint (two with aligned cells), same
    seed and budget, then generates answers for the task's held-out rows and scores them (trainer.metrics).
    The report puts, per task, the level the trained gates of each dynamic cell favour next to the level of
    the best static cell: the paper's finding (each task wants its own level) made automatic.

OUT_DIR/
  stage1/             the shared stage-1 run (projector alignment); run/align/export seeds every cell
  stage1_aligned/     align_selfies then align, for the `aligned` dynamic cells (only when there are some)
  cells/TASK/CELL/    recipe.yaml, train.log, run/ (checkpoints, export), preds.jsonl, result.json
  results.csv         one row per (task, cell): settings, status, training loss, every metric
  results.md          the scale of the run, then one table per task
  TASK.png            bar chart per task (the task's headline metrics, one bar per cell)

A cell whose result.json matches its settings is not rerun; an interrupted one resumes from its last
checkpoint (trainer.loop), a failed one is reported in the tables and retried on the next call. Every
training run is `trainer/run.py` in a subprocess, under `accelerate launch --config_file LAUNCH` when the
recipe names one (2 CPU processes, 8 GPUs, several nodes): the demo and the full-scale study are the same
recipe with other sizes (launch_configs/recipes/experiments_demo.yaml, experiments_paper.yaml).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import yaml

from graph.atomic import atomic_write_json, atomic_writer

from .config import ConfigError, apply_overrides, from_dict, load_yaml
from .models.projector import LEVELS, REDUCTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTROLS = ("selfies_only", "graph_only")
# The columns each task's chart shows (results.csv and results.md hold every metric).
# validity_nonempty: MolT5's `validity` counts an empty answer as valid (RDKit parses ""), which flatters an
# untrained model; the chart shows the stricter key (results.csv has both).
HEADLINE = {"forward": ("exact_match", "validity_nonempty", "morgan_fts", "maccs_fts"),
            "reagent": ("exact_match", "validity_nonempty", "morgan_fts", "maccs_fts"),
            "retrosynthesis": ("exact_match", "validity_nonempty", "morgan_fts", "maccs_fts"),
            "molcap": ("bleu2", "bleu4", "rougeL", "meteor"),
            "property": ("mae", "parsed"),
            "grounding": ("accuracy", "yesno_accuracy", "count_accuracy", "chance_accuracy")}
PROMPTS = ("both", "graph_only")
DYNAMIC_KEYS = {"name", "fusion", "condition", "reduction", "levels", "queries", "tasks", "aligned", "prompt"}


@dataclass
class Grid:
    reductions: list[str] = field(default_factory=lambda: list(REDUCTIONS))
    levels: list[list[str]] = field(default_factory=lambda: [["node"], ["motif"], ["graph"], list(LEVELS)])
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))
    control_projector: dict = field(default_factory=lambda: {"reduction": "none", "levels": list(LEVELS)})
    prompts: list[str] = field(default_factory=lambda: ["both"])  # both | graph_only, for the static cells
    # dynamic projector cells: {name, fusion, condition, reduction, levels, queries, aligned, prompt: both|graph_only}
    dynamic: list[dict] = field(default_factory=list)


@dataclass
class EvalSettings:
    limit: int | None = 32  # held-out rows per task (null: all of them)
    max_new_tokens: int = 128
    num_beams: int = 1
    batch_size: int = 8
    text_tokenizer: str | None = None  # molcap word pieces (default: offline bert-base-uncased)
    launch: str | None = None  # accelerate config for generation (rank slices gathered in order); null: one process


@dataclass
class Recipe:
    out_dir: str = "runs/experiments"
    seed: int = 0
    tasks: list[str] = field(default_factory=lambda: ["forward", "reagent", "molcap"])
    # {task: {train: FOLDER, test: FOLDER}}; a task not listed is built from the shipped samples (data/)
    data: dict = field(default_factory=dict)
    launch: str | None = None  # accelerate config for every training run; null: one plain process
    log_with: str = "none"
    mixed_precision: str = "no"  # no | bf16 | fp16 | auto (trainer.run.resolve_precision), training and generation
    grid: Grid = field(default_factory=Grid)
    eval: EvalSettings = field(default_factory=EvalSettings)
    align: dict = field(default_factory=dict)  # stage 1 section (trainer/stages/align.py); data defaults below
    align_selfies: dict = field(default_factory=dict)  # for aligned cells (trainer/stages/align_selfies.py)
    lora: dict = field(default_factory=dict)  # stage 2 section; data, projector and prompt are set per cell


def load_recipe(path: str, overrides: list[str] = ()) -> Recipe:
    from .evaluate import TASKS
    from .run import precision_value

    r = from_dict(Recipe, precision_value(apply_overrides(load_yaml(path), list(overrides))))

    for t in r.tasks:
        if t not in TASKS:
            raise ConfigError(f"tasks: unknown task {t!r}; choose from {list(TASKS)}")
    for t, d in r.data.items():
        if not isinstance(d, dict) or set(d) != {"train", "test"}:
            raise ConfigError(f"data.{t}: give both folders, {{train: FOLDER, test: FOLDER}}")
    g = r.grid
    for x in g.reductions:
        if x not in REDUCTIONS:
            raise ConfigError(f"grid.reductions: {x!r} is not one of {list(REDUCTIONS)}")
    for lv in g.levels:
        if not lv or set(lv) - set(LEVELS):
            raise ConfigError(f"grid.levels: each entry a non-empty subset of {list(LEVELS)}, got {lv}")
    for c in g.controls:
        if c not in CONTROLS:
            raise ConfigError(f"grid.controls: {c!r} is not one of {list(CONTROLS)}")
    if set(g.control_projector) - {"reduction", "levels"}:
        raise ConfigError("grid.control_projector: only reduction and levels")
    for x in g.prompts:
        if x not in PROMPTS:
            raise ConfigError(f"grid.prompts: {x!r} is not one of {list(PROMPTS)}")
    for i, d in enumerate(g.dynamic):
        if not isinstance(d, dict) or "name" not in d or set(d) - DYNAMIC_KEYS:
            raise ConfigError(f"grid.dynamic[{i}]: a mapping with a name and only {sorted(DYNAMIC_KEYS)}, got {d}")
        if d.get("prompt", "both") not in PROMPTS:
            raise ConfigError(f"grid.dynamic[{i}].prompt: one of {list(PROMPTS)}")
    names = [c["name"] for c in cells(g)]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid: cell names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    for key, launch in (("launch", r.launch), ("eval.launch", r.eval.launch)):
        if launch:
            _path(launch, key)
    for key in ("data", "init_projector", "init_encoder"):
        if key in r.lora:
            raise ConfigError(f"lora.{key}: set per cell by the runner (task data, the stage-1 export); remove it")
    return r


def _path(p: str, key: str) -> str:
    full = p if os.path.isabs(p) else os.path.join(ROOT, p)
    if not os.path.exists(full):
        raise ConfigError(f"{key}: not found: {p}")
    return full


# -- the grid -------------------------------------------------------------------------------------------
def cells(grid: Grid) -> list[dict]:
    """[{name, reduction, levels, use_graph, use_selfies, projector, aligned}] in table order."""
    out = [{"name": ("" if pr == "both" else f"{pr}/") + f"{red}/{'+'.join(lv)}", "reduction": red, "levels": list(lv),
            "use_graph": True, "use_selfies": pr == "both", "projector": {}, "aligned": False}
           for pr in grid.prompts for red in grid.reductions for lv in grid.levels]
    cp = {"reduction": "none", "levels": list(LEVELS), **grid.control_projector}
    for c in grid.controls:
        graph = c == "graph_only"
        out.append({"name": c, "reduction": cp["reduction"] if graph else "-", "levels": cp["levels"] if graph else [],
                    "use_graph": graph, "use_selfies": not graph, "projector": {}, "aligned": False})
    for d in grid.dynamic:
        proj = {"kind": "dynamic", **{k: d[k] for k in ("fusion", "condition", "queries", "tasks") if k in d}}
        out.append({"name": d["name"], "reduction": d.get("reduction", "hierarchical"), "levels": list(d.get("levels", LEVELS)),
                    "use_graph": True, "use_selfies": d.get("prompt", "both") == "both", "projector": proj,
                    "aligned": bool(d.get("aligned", False))})
    return out


def _slug(name: str) -> str:
    return name.replace("/", "__").replace("+", "-")


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def stage1_recipe(r: Recipe, folders: dict, aligned: bool = False) -> dict:
    """The shared stage-1 run; `aligned`: the align_selfies stage first (on every task's training molecules)."""
    align = copy.deepcopy(r.align)
    # the paper aligns on molecule-text pairs: description data when the study has it, else every task
    align.setdefault("data", [folders["molcap"]["train"]] if "molcap" in folders else [f["train"] for f in folders.values()])
    rec = {"run_dir": os.path.join(r.out_dir, "stage1_aligned" if aligned else "stage1", "run"), "seed": r.seed,
           "log_with": r.log_with, "mixed_precision": precision(r), "stages": ["align"], "align": align}
    if aligned:
        a = copy.deepcopy(r.align_selfies)
        a.setdefault("data", [f["train"] for f in folders.values()])
        for k in ("init_encoder", "encoder", "llm"):  # align starts from this projector: same encoder and LLM
            if k in align and k not in a:
                a[k] = copy.deepcopy(align[k])
        rec.update(stages=["align_selfies", "align"], align_selfies=a)
    return rec


def cell_recipe(r: Recipe, task: str, cell: dict, train: str, stage1_export: str) -> dict:
    lora = copy.deepcopy(r.lora)
    proj = {**lora.get("projector", {})}
    if cell["use_graph"]:
        proj.update(reduction=cell["reduction"], levels=cell["levels"], **cell.get("projector", {}))
    prompt = {**lora.get("prompt", {}), "use_graph": cell["use_graph"], "use_selfies": cell["use_selfies"]}
    lora.update(data=[train], projector=proj, prompt=prompt,
                init_projector=os.path.join(stage1_export, "projector"), init_encoder=os.path.join(stage1_export, "encoder"))
    return {"run_dir": os.path.join(r.out_dir, "cells", task, _slug(cell["name"]), "run"), "seed": r.seed,
            "log_with": r.log_with, "mixed_precision": precision(r), "stages": ["lora"], "lora": lora}


def validate_runs(recipes: list[dict]) -> None:
    """Every run recipe checked as trainer/run.py checks it (keys, choices, paths) before any training; the
    stage-1 export the cells start from does not exist yet and is left out of the check."""
    from .run import run_config

    for rec in recipes:
        rec = copy.deepcopy(rec)
        for section in rec["stages"]:
            for key in ("init_projector", "init_encoder"):
                if rec[section].get(key) and not os.path.exists(rec[section][key]):
                    rec[section][key] = None
        run_config(rec)


# -- running --------------------------------------------------------------------------------------------
def _launcher(launch: str | None) -> list[str]:
    if not launch:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", _path(launch, "launch")]


def train_key(recipe: dict, launch: str | None) -> str:
    """What makes two training runs the same run: the whole run recipe and the launch file."""
    return _key({"run": recipe, "launch": launch})


def claim_run_dir(recipe: dict, folder: str, launch: str | None) -> bool:
    """Keep the recipe's run_dir (checkpoints to resume) only when it was trained by this very run
    (FOLDER/train_key); else empty it. True when it was kept."""
    import shutil

    os.makedirs(folder, exist_ok=True)
    key, key_file = train_key(recipe, launch), os.path.join(folder, "train_key")
    if os.path.exists(key_file) and open(key_file).read() == key:
        return True
    shutil.rmtree(recipe["run_dir"], ignore_errors=True)
    with open(key_file, "w") as f:
        f.write(key)
    return False


def run_child(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """subprocess.run for the study's training / generation children, in their own process group. If
    this process is interrupted (Ctrl-C, or SIGTERM under `sigterm_interrupts`) the whole group gets
    SIGTERM, then SIGKILL after 10 s: an `accelerate launch` child's ranks stop with it instead of
    running on as orphans."""
    with subprocess.Popen(cmd, start_new_session=True, **kw) as p:
        try:
            out, _ = p.communicate()
        except BaseException:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=10)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out)


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (a scheduler's or `kill`'s stop) raises KeyboardInterrupt in the main thread, so
    `run_child` stops the children; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def train_run(recipe: dict, folder: str, launch: str | None) -> dict:
    """`trainer/run.py` on the recipe in a subprocess (log in FOLDER/train.log); its JSON summary.
    The same recipe resumes from its last checkpoint (a finished run returns at once); another recipe
    starts from scratch: resuming another run's checkpoint would report that run's model."""
    claim_run_dir(recipe, folder, launch)
    path = os.path.join(folder, "recipe.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    with open(os.path.join(folder, "train.log"), "w") as log:
        p = run_child([*_launcher(launch), os.path.join(ROOT, "trainer", "run.py"), "--config", path],
                      cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(p.stdout)
    if p.returncode != 0:
        raise RuntimeError(f"training exited with {p.returncode}; see {os.path.join(folder, 'train.log')}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def evaluate_cell(task: str, export: str, test: str, folder: str, ev: EvalSettings,
                  mixed_precision: str = "no") -> tuple[dict, int]:
    """Generate answers for the held-out rows (`python -m trainer.generate`, in the cell's training precision)
    and score every row."""
    from .evaluate import compute, read_rows

    preds = os.path.join(folder, "preds.jsonl")
    cmd = [*_launcher(ev.launch), "-m", "trainer.generate", "--model", export, "--data", test, "--out", preds,
           "--batch-size", str(ev.batch_size), "--max-new-tokens", str(ev.max_new_tokens), "--num-beams", str(ev.num_beams),
           "--mixed-precision", mixed_precision]
    cmd += ["--limit", str(ev.limit)] if ev.limit is not None else []
    with open(os.path.join(folder, "generate.log"), "w") as log:
        p = run_child(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise RuntimeError(f"generation exited with {p.returncode}; see {os.path.join(folder, 'generate.log')}")
    targets, outputs, metas, _ = read_rows(preds)
    return compute(task, targets, outputs, text_tokenizer=ev.text_tokenizer, metadata=metas), len(targets)


def run_cell(r: Recipe, task: str, cell: dict, recipe: dict, test: str, key: str) -> dict:
    folder = os.path.dirname(recipe["run_dir"])
    base = {"task": task, "cell": cell["name"], "reduction": cell["reduction"], "levels": "+".join(cell["levels"]) or "-",
            "use_graph": cell["use_graph"], "use_selfies": cell["use_selfies"], "dynamic": bool(cell.get("projector")),
            "aligned": cell.get("aligned", False), "key": key}
    t0 = time.time()
    try:
        summary = train_run(recipe, folder, r.launch)["stages"]["lora"]
        t1 = time.time()
        metrics, n = evaluate_cell(task, summary["export"], test, folder, r.eval, precision(r))
        result = {**base, "status": "done", "steps": summary["steps"], "train_loss": summary.get("loss"),
                  "samples": summary.get("samples"), "n_eval": n, "train_s": round(t1 - t0, 1),
                  "eval_s": round(time.time() - t1, 1), "metrics": metrics}
        if summary.get("gates"):
            result["gates"] = summary["gates"]
    except Exception as e:  # one broken cell is reported and retried later; the study goes on
        result = {**base, "status": "failed", "error": f"{type(e).__name__}: {e}", "metrics": {}}
    atomic_write_json(result, os.path.join(folder, "result.json"))
    return result


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# -- reports --------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `columns` (a row's `metrics` entries are read like its own keys)."""
    def cell(row, c):
        return _fmt(row.get(c, row.get("metrics", {}).get(c)))

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


LOWER_IS_BETTER = {"levenshtein", "levenshtein_canonical", "mae", "number_mae", "number_chance_mae"}


def compare(rows: list[dict], metrics: tuple) -> list[str]:
    """One line per metric: the best cell(s) and where the graph-token cells stand against SELFIES only."""
    lines = []
    for m in metrics:
        scored = [(x["cell"], x["metrics"][m]) for x in rows if x["metrics"].get(m) is not None]
        if not scored:
            continue
        pick = min if m in LOWER_IS_BETTER else max
        best = pick(v for _, v in scored)
        tied = [c for c, v in scored if v == best]
        line = f"{m}: best {_fmt(best)} ({', '.join(tied) if len(tied) <= 3 else f'{len(tied)} cells tie'})"
        base = dict(scored).get("selfies_only")
        if base is not None:
            graph = [v for c, v in scored if c not in CONTROLS]
            better = sum((v < base) if m in LOWER_IS_BETTER else (v > base) for v in graph)
            line += f"; SELFIES only {_fmt(base)}, beaten by {better} of {len(graph)} graph-token cells"
        lines.append(line)
    return lines


def write_reports(out_dir: str, results: list[dict], scale: str) -> dict:
    """results.csv, results.md and one bar chart per task; returns their paths."""
    metric_names = sorted({k for x in results for k, v in x["metrics"].items() if _scalar(v)})
    fixed = ["task", "cell", "reduction", "levels", "use_graph", "use_selfies", "dynamic", "aligned", "status", "steps",
             "train_loss", "n_eval"]
    with atomic_writer(os.path.join(out_dir, "results.csv")) as f:
        w = csv.writer(f)
        w.writerow(fixed + metric_names)
        for x in results:
            w.writerow([x.get(c, "") for c in fixed] + [x["metrics"].get(m, "") for m in metric_names])
    parts = ["# Graph level x token reduction study", "", scale, ""]
    charts = {}
    for task in dict.fromkeys(x["task"] for x in results):
        rows = [x for x in results if x["task"] == task]
        names = sorted({k for x in rows for k, v in x["metrics"].items() if _scalar(v)},
                       key=lambda k: (k not in HEADLINE.get(task, ()), k))
        parts += [f"## {task}", "", markdown_table(rows, ["cell", "status", "train_loss", "n_eval", *names]), ""]
        parts += [f"- {line}" for line in compare(rows, HEADLINE.get(task, tuple(names[:2]))[:2])] + [""]
        parts += gates_section(task, rows, HEADLINE.get(task, tuple(names[:1]))[0])
        charts[task] = bar_chart(os.path.join(out_dir, f"{task}.png"), task, rows, HEADLINE.get(task, tuple(names[:4])))
    parts += ["Cells that failed list `failed` and no metrics; see cells/TASK/CELL/train.log.", ""]
    with atomic_writer(os.path.join(out_dir, "results.md")) as f:
        f.write("\n".join(parts))
    return {"csv": os.path.join(out_dir, "results.csv"), "markdown": os.path.join(out_dir, "results.md"), "charts": charts}


def _scalar(v) -> bool:
    return v is None or isinstance(v, (int, float, str))


def favoured(gates: dict, levels: list[str]) -> str:
    return max(levels, key=lambda lv: gates.get(lv, 0.0))


def best_static(rows: list[dict], metric: str, use_selfies: bool) -> dict | None:
    """The best static reduction x level cell (graph tokens; with or without SELFIES) on `metric`."""
    static = [x for x in rows if x["use_graph"] and not x.get("dynamic") and x["cell"] not in CONTROLS
              and x["use_selfies"] == use_selfies and x["metrics"].get(metric) is not None]
    if not static:
        return None
    pick = min if metric in LOWER_IS_BETTER else max
    return pick(static, key=lambda x: x["metrics"][metric])


def gates_section(task: str, rows: list[dict], metric: str) -> list[str]:
    """Markdown: per dynamic cell, its trained gates (mean over the task's training rows), the level they favour
    and the best static cell's level; then the gates per question type (the grounding probe has several)."""
    dyn = [x for x in rows if x.get("gates")]
    if not dyn:
        return []
    lines = [f"### {task}: level gates of the dynamic cells", "",
             f"| cell | node | motif | graph | favoured | best static cell ({metric}) | its levels |", "|---|---|---|---|---|---|---|"]
    for x in dyn:
        g = x["gates"]
        levels = g["levels"]
        mean = _mean_gates(g["by_task"], levels)
        best = best_static(rows, metric, x["use_selfies"])
        lines.append(f"| {x['cell']} | " + " | ".join(_fmt(mean.get(lv)) for lv in LEVELS) + f" | {favoured(mean, levels)} | "
                     + (f"{best['cell']} ({_fmt(best['metrics'][metric])}) | {best['levels']} |" if best else "- | - |"))
    lines.append("")
    for x in dyn:
        by_qt = x["gates"].get("by_question_type") or {}
        if len(by_qt) < 2:
            continue
        lines += [f"Gates of `{x['cell']}` per question type:", "", "| question type | node | motif | graph | favoured |",
                  "|---|---|---|---|---|"]
        lines += [f"| {qt} | " + " | ".join(_fmt(g.get(lv)) for lv in LEVELS) + f" | {favoured(g, x['gates']['levels'])} |"
                  for qt, g in by_qt.items()]
        lines.append("")
    return lines


def _mean_gates(by_task: dict, levels: list[str]) -> dict:
    """Sample-weighted mean of the per-task gates (a cell trains on one task, so usually that task's)."""
    n = sum(g["samples"] for g in by_task.values()) or 1
    return {lv: sum(g[lv] * g["samples"] for g in by_task.values()) / n for lv in levels}


def bar_chart(path: str, task: str, rows: list[dict], metrics: tuple) -> str:
    """One horizontal bar per cell for each headline metric, side by side (PNG)."""
    from matplotlib.figure import Figure

    labels = [x["cell"] for x in rows]
    fig = Figure(figsize=(3.2 * len(metrics) + 1.5, 0.32 * len(rows) + 1.4))
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    for ax, m in zip(axes, metrics):
        values = [x["metrics"].get(m) for x in rows]
        ax.barh(range(len(rows)), [v or 0.0 for v in values], color=["#888" if not x["use_graph"] or not x["use_selfies"]
                                                                      else "#3a7" for x in rows])
        for i, v in enumerate(values):
            ax.text(v or 0.0, i, f" {_fmt(v)}", va="center", fontsize=7)
        top = max([v for v in values if v is not None] or [0.0])
        ax.set_xlim(0, top * 1.3 if top > 0 else 1.0)  # an all-zero metric still reads as zero, not as a tiny axis
        ax.set_title(m, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(range(len(rows)), labels)
    axes[0].invert_yaxis()
    fig.suptitle(f"{task}: held-out metrics per cell (grey: controls)", fontsize=10)
    fig.tight_layout()
    with atomic_writer(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return path


# -- the command ----------------------------------------------------------------------------------------
def task_folders(r: Recipe) -> dict:
    """{task: {train, test}}: the recipe's folders, the shipped samples built into OUT_DIR/data otherwise."""
    folders = {t: {k: _path(v, f"data.{t}.{k}") for k, v in r.data[t].items()} for t in r.tasks if t in r.data}
    missing = [t for t in r.tasks if t not in folders]
    if "grounding" in missing:
        folders["grounding"] = grounding_folders(os.path.join(r.out_dir, "data"))
        missing.remove("grounding")
    if missing:
        from .dataset.tasks import SHIPPED, _ray, prepare_shipped

        for t in missing:
            if t not in SHIPPED or SHIPPED[t][1] is None:
                raise ConfigError(f"data.{t}: no shipped sample for {t!r}; give {{train: FOLDER, test: FOLDER}}")
        out = os.path.join(r.out_dir, "data")
        with _ray():
            train = prepare_shipped(out, tuple(missing), "train")
            test = prepare_shipped(out, tuple(missing), "test")
        folders.update({t: {"train": train[t], "test": test[t]} for t in missing})
    return folders


def grounding_folders(out: str, sources: list[str] | None = None, **kw) -> dict:
    """The grounding probe from real molecules (default: the shipped ChEBI-20 files; trainer.dataset.grounding), its
    held-out molecules disjoint by InChIKey, preprocessed into OUT/grounding_{train,test}; reruns reuse both."""
    from graph.preprocess import run as preprocess

    from .dataset.grounding import build
    from .dataset.tasks import _ray

    os.makedirs(out, exist_ok=True)
    files = {s: os.path.join(out, f"grounding_{s}.jsonl") for s in ("train", "test")}
    if not all(os.path.exists(f) for f in files.values()):
        build(sources, files["train"], files["test"], **kw)
    with _ray():
        return {s: (preprocess(f, f[:-6], fmt="instructions", progress=False), f[:-6])[1] for s, f in files.items()}


def precision(r: Recipe) -> str:
    """The runs' mixed precision, `auto` resolved as a one-process run resolves it (trainer.run), so a cell's key
    names what it trained in: a study resumed on a machine without bf16 does not reuse bf16 cells. Under a
    launch file each rank resolves it (DeepSpeed without a GPU keeps fp32)."""
    from .run import resolve_precision

    return resolve_precision(r.mixed_precision) if not r.launch else r.mixed_precision


def scale_line(r: Recipe, stage1: dict, folders: dict) -> str:
    lora = r.lora
    t, b = lora.get("train", {}), lora.get("batching", {})
    return (f"Scale: LLM `{lora.get('llm', {}).get('name', 'smollm2-135m')}`; stage 1 {stage1.get('steps')} steps; "
            f"stage 2 per cell {t.get('max_steps', 300)} steps x {t.get('grad_accum', 1)} micro-batches of "
            f"{b.get('rows', 1)} packed row(s) x {b.get('budget', 2048)} tokens per process, lr {t.get('lr', 2e-4)}, "
            f"seed {r.seed}, launch `{r.launch or 'one process'}`, mixed precision `{precision(r)}`; evaluation on "
            f"{'all' if r.eval.limit is None else f'the first {r.eval.limit}'} held-out rows per task, "
            f"{'greedy' if r.eval.num_beams == 1 else f'beam {r.eval.num_beams}'}, {r.eval.max_new_tokens} new tokens. "
            f"Train / test folders: " + "; ".join(f"{k}: {v['train']} / {v['test']}" for k, v in folders.items()) + ".")


def run(r: Recipe) -> dict:
    with sigterm_interrupts():
        return _run(r)


def _run(r: Recipe) -> dict:
    from tqdm import tqdm

    r.out_dir = os.path.abspath(r.out_dir)
    os.makedirs(r.out_dir, exist_ok=True)
    folders = task_folders(r)
    grid = cells(r.grid)
    s1s = {False: stage1_recipe(r, folders)}
    if any(c["aligned"] for c in grid):
        s1s[True] = stage1_recipe(r, folders, aligned=True)
    exports = {a: os.path.join(rec["run_dir"], "align", "export") for a, rec in s1s.items()}
    plan = [(t, c, cell_recipe(r, t, c, folders[t]["train"], exports[c["aligned"]])) for t in r.tasks for c in grid]
    validate_runs(list(s1s.values()) + [rec for _, _, rec in plan])  # every run's recipe, before any training
    s1_keys = {a: train_key(rec, r.launch) for a, rec in s1s.items()}
    stage1 = {a: stage1_run(r, rec, s1_keys[a], exports[a]) for a, rec in s1s.items()}[False]
    scale = scale_line(r, stage1, folders)
    leaks = leak_check(r.out_dir, folders)
    scale += "\n\nLeak check (held-out rows whose molecules occur in the task's training data; trainer.data.overlap): " \
        + "; ".join(x["summary"] for x in leaks.values()) + "."
    print(f"[experiments] {len(plan)} cells ({len(r.tasks)} tasks x {len(grid)}). {scale}", file=sys.stderr)
    results, ran, skipped = [], 0, 0
    for task, cell, rec in tqdm(plan, desc="cells", file=sys.stderr):
        scoring = {k: getattr(r.eval, k) for k in ("limit", "max_new_tokens", "num_beams", "text_tokenizer")}
        key = _key({"stage1": s1_keys[cell["aligned"]], "run": rec, "launch": r.launch, "eval": scoring,
                    "test": folders[task]["test"]})
        done = _read_json(os.path.join(os.path.dirname(rec["run_dir"]), "result.json"))
        if done and done.get("status") == "done" and done.get("key") == key:
            results.append(done)
            skipped += 1
            continue
        results.append(run_cell(r, task, cell, rec, folders[task]["test"], key))
        ran += 1
        x = results[-1]
        print(f"[experiments] {task} {cell['name']}: {x['status']} {x.get('error', '')}"
              f"{json.dumps({k: round(v, 4) for k, v in x['metrics'].items() if isinstance(v, float)})}", file=sys.stderr)
    reports = write_reports(r.out_dir, results, scale)
    with open(reports["markdown"]) as f:
        print(f.read(), file=sys.stderr)
    failed = [f"{x['task']} {x['cell']}" for x in results if x["status"] != "done"]
    return {"out_dir": r.out_dir, "cells": len(results), "ran": ran, "skipped": skipped, "failed": failed,
            "scale": scale, "overlap": {t: {k: x[k] for k in ("test_rows", "overlapping_rows", "overlap_fraction")}
                                        for t, x in leaks.items()}, **reports}


def leak_check(out_dir: str, folders: dict) -> dict:
    """{task: overlap of its held-out rows with its training rows} (OUT_DIR/overlap.json), by standardised InChIKey."""
    from .data import overlap, summary_line

    out = {}
    for t, f in folders.items():
        x = overlap([f["train"]], f["test"], task=t)
        out[t] = {**x, "summary": summary_line(x, t)}
    atomic_write_json(out, os.path.join(out_dir, "overlap.json"))
    return out


def stage1_run(r: Recipe, rec: dict, key: str, export: str) -> dict:
    """Run (or reuse, when its result.json has the same key) one shared stage-1 run."""
    folder = os.path.dirname(rec["run_dir"])
    done = _read_json(os.path.join(folder, "result.json"))
    if done and done.get("key") == key and os.path.isdir(export):
        print(f"[experiments] stage 1 reused: {export}", file=sys.stderr)
        return done
    print(f"[experiments] stage 1 ({' -> '.join(rec['stages'])})", file=sys.stderr)
    stages = train_run(rec, folder, r.launch)["stages"]
    m = stages["align"]
    out = {"key": key, "steps": m["steps"], "loss": m.get("loss"), "export": m["export"]}
    if "align_selfies" in stages:
        a = stages["align_selfies"]
        out["align_selfies"] = {"steps": a["steps"], "loss": a.get("loss"), "selfies_contrastive": a.get("selfies_contrastive")}
    atomic_write_json(out, os.path.join(folder, "result.json"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.experiments", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="experiments recipe, e.g. launch_configs/recipes/experiments_demo.yaml")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. lora.train.max_steps=3000 eval.limit=null")
    a = p.parse_args(argv)
    try:
        r = load_recipe(a.config, a.overrides)
        summary = run(r)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # stage 1 failed: no cell can start
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
