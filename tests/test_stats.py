"""Paired comparisons of two cells (trainer.stats) and the per-row grounding correctness they read
(trainer.metrics.grounding_correct), on hand-computed cases."""
import pytest

from trainer.metrics import grounding_correct, grounding_metrics
from trainer.stats import paired_difference


def test_identical_cells_differ_by_exactly_zero():
    a = [True, False, True, True, False, False]
    d = paired_difference(a, list(a), clusters=["m1", "m1", "m2", "m2", "m3", "m3"])
    assert d["diff"] == 0.0 and d["ci95"] == [0.0, 0.0] and d["verdict"] == "inconclusive"
    assert d["rows"] == 6 and d["clusters"] == 3


def test_a_cell_right_everywhere_beats_one_wrong_everywhere():
    d = paired_difference([True] * 8, [False] * 8)
    assert d["diff"] == 1.0 and d["ci95"] == [1.0, 1.0] and d["verdict"] == "a_higher"
    assert paired_difference([False] * 8, [True] * 8)["verdict"] == "b_higher"


def test_difference_is_the_accuracy_difference():
    # a: 3 of 5 right, b: 1 of 5 right -> 0.4, whatever the clusters
    a, b = [True, True, True, False, False], [True, False, False, False, False]
    assert paired_difference(a, b)["diff"] == pytest.approx(0.4)
    assert paired_difference(a, b, clusters=[1, 1, 2, 2, 3])["diff"] == pytest.approx(0.4)


def test_clusters_widen_the_interval_when_their_rows_agree():
    # 40 molecules x 5 questions; a beats b on whole molecules (all 5 rows together), so the evidence is 40
    # independent units, not 200: resampling molecules must give a wider interval than resampling rows
    a, b, mols = [], [], []
    for m in range(40):
        a += [m % 2 == 0] * 5
        b += [m % 4 == 0] * 5
        mols += [f"mol{m}"] * 5
    rows = paired_difference(a, b, resamples=3000, seed=1)
    clustered = paired_difference(a, b, clusters=mols, resamples=3000, seed=1)
    assert rows["diff"] == clustered["diff"] == pytest.approx(0.25)
    width = lambda d: d["ci95"][1] - d["ci95"][0]  # noqa: E731
    assert width(clustered) > 1.8 * width(rows)  # ~sqrt(5) wider
    assert clustered["ci95"][0] <= 0.25 <= clustered["ci95"][1]


def test_same_seed_same_interval_and_bad_input_refused():
    a, b = [True, False, True, False, True], [False, False, True, True, False]
    assert paired_difference(a, b, seed=3) == paired_difference(a, b, seed=3)
    with pytest.raises(ValueError, match="paired rows"):
        paired_difference(a, b[:4])
    with pytest.raises(ValueError, match="cluster ids"):
        paired_difference(a, b, clusters=[1, 2])
    with pytest.raises(ValueError, match="no rows"):
        paired_difference([], [])


def test_grounding_correct_rows_average_to_the_metrics():
    targets = ["yes", "no", "yes", "3", "2", "3", "1.25", "no"]
    outputs = ["Yes.", "yes", "maybe", "3", "two", "3 rings", "1.3", "no"]
    metas = [{"question_type": "has_amine"}, {"question_type": "has_amine"}, {"question_type": "has_ester"},
             {"question_type": "num_rings"}, {"question_type": "num_rings"}, {"question_type": "num_rings"},
             {"question_type": "logp"}, {"question_type": "has_ester"}]
    right = grounding_correct(targets, outputs, metas)
    # hand-checked: yes|Yes. right, no|yes wrong, yes|maybe wrong, 3|3 right, 2|two wrong, 3|3 rings right,
    # logP is a number row (not scored by accuracy), no|no right
    assert right == [True, False, False, True, False, True, None, True]
    chance = grounding_correct(targets, outputs, metas, chance=True)
    # best constants: has_amine yes (tie, first seen), has_ester yes (tie), num_rings 3
    assert chance == [True, False, True, True, False, True, None, False]
    m = grounding_metrics(targets, outputs, metas)
    scored = [r for r in right if r is not None]
    assert m["accuracy"] == pytest.approx(sum(scored) / len(scored))
    assert m["chance_accuracy"] == pytest.approx(sum(c for c in chance if c is not None) / len(scored))


def test_grounding_benchmark_reports_paired_intervals(tmp_path):
    """benchmarks.grounding's summary reads each cell's predictions and compares cells row by row: a cell
    right on every row beats chance and the weaker cells with intervals above 0; two cells with the same
    answers differ by exactly 0."""
    import json

    from benchmarks.grounding import summarise
    from trainer.experiments import _slug

    mols = [f"KEY{i:02d}-AAAAAAAAAA-N" for i in range(30)]
    rows = []  # 30 molecules x (2 yes/no, 1 count)
    for i, key in enumerate(mols):
        rows += [("yes" if i % 2 else "no", "has_amine", key), ("no" if i % 3 else "yes", "has_ester", key),
                 (str(i % 4), "num_rings", key)]
    right = [t for t, _, _ in rows]
    wrong_half = [t if j % 2 else ("maybe" if t in ("yes", "no") else "99") for j, (t, _, _) in enumerate(rows)]
    answers = {"graph_only/hierarchical/graph": right, "selfies_only": wrong_half, "dynamic": right,
               "dynamic_aligned": right}
    results = []
    for cell, outs in answers.items():
        folder = tmp_path / "cells" / "grounding" / _slug(cell)
        folder.mkdir(parents=True)
        metas = [{"question_type": qt, "inchikey": key} for _, qt, key in rows]
        with open(folder / "preds.jsonl", "w") as f:
            for (t, _, _), o, m in zip(rows, outs, metas):
                f.write(json.dumps({"target": t, "prediction": o, "metadata": m}) + "\n")
        results.append({"cell": cell, "status": "done", "use_graph": cell != "selfies_only", "use_selfies": cell == "selfies_only",
                        "dynamic": cell.startswith("dynamic"), "aligned": cell == "dynamic_aligned", "n_eval": len(rows),
                        "metrics": grounding_metrics([t for t, _, _ in rows], outs, metas)})
    out = summarise(results, 1.0, str(tmp_path))
    c = out["comparisons"]
    assert out["best_static_graph_only_accuracy"] == 1.0
    assert c["best_static_minus_chance"]["diff"] == pytest.approx(1.0 - out["chance_accuracy"], abs=1e-4)
    assert c["best_static_minus_chance"]["verdict"] == "a_higher" and c["best_static_minus_chance"]["clusters"] == 30
    assert c["best_static_minus_selfies_only"]["diff"] == pytest.approx(0.5, abs=0.02)
    assert c["best_static_minus_selfies_only"]["verdict"] == "a_higher"
    for same in ("dynamic_minus_best_static", "aligned_minus_dynamic"):
        assert c[same]["diff"] == 0.0 and c[same]["verdict"] == "inconclusive", c[same]
