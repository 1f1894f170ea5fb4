"""How sure is an accuracy difference? A paired bootstrap over clusters of rows.

Two cells of a study answer the same held-out rows, so their accuracies are compared row by row (paired),
not as two independent numbers. Rows are not independent either: the grounding probe asks each held-out
molecule several questions, and a model that misreads a molecule tends to miss all of them. So the
bootstrap resamples whole clusters (molecules, by InChIKey), as many as there are, with replacement, and
takes the difference of the two accuracies on each resample:

    d = paired_difference(correct_a, correct_b, clusters)   # {"diff", "ci95": [lo, hi], "clusters", ...}

`ci95` is the 2.5 / 97.5 percentile interval of that difference. An interval that holds 0 means the data
cannot tell the cells apart; `verdict` says "a_higher", "b_higher" or "inconclusive".
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def paired_difference(a: Sequence[bool], b: Sequence[bool], clusters: Sequence | None = None,
                      resamples: int = 2000, seed: int = 0) -> dict:
    """accuracy(a) - accuracy(b) over the same rows, with a 95% percentile interval from `resamples`
    bootstrap draws of whole clusters (`clusters[i]`: row i's cluster id; None: every row its own)."""
    if len(a) != len(b):
        raise ValueError(f"paired rows: {len(a)} against {len(b)}")
    if not len(a):
        raise ValueError("no rows to compare")
    ids = list(range(len(a))) if clusters is None else list(clusters)
    if len(ids) != len(a):
        raise ValueError(f"{len(ids)} cluster ids for {len(a)} rows")
    index = {c: i for i, c in enumerate(dict.fromkeys(ids))}
    k = np.array([index[c] for c in ids])
    n = len(index)
    # per cluster: rows, and rows a / b got right; a resample is a count vector over clusters
    rows = np.bincount(k, minlength=n).astype(float)
    diff_right = np.bincount(k, weights=np.asarray(a, float) - np.asarray(b, float), minlength=n)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)
    draws = (counts @ diff_right) / (counts @ rows)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    diff = float(diff_right.sum() / rows.sum())
    verdict = "a_higher" if lo > 0 else "b_higher" if hi < 0 else "inconclusive"
    return {"diff": round(diff, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)], "verdict": verdict,
            "rows": len(a), "clusters": n, "resamples": resamples}
