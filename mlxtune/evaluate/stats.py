"""Paired bootstrap confidence intervals (is model A really better than model B on these
prompts?) and the terminal table that shows them."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(a, b, samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of a - b over paired examples and its bootstrap interval (fixed seed: reproducible)."""
    diffs = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(diffs)
    if n == 0:
        return {"diff": None, "low": None, "high": None, "n": 0}
    rng = np.random.default_rng(seed)
    # Resample examples, not scores: both models' answers to one prompt stay together.
    means = diffs[rng.integers(0, n, size=(samples, n))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(diffs.mean()), "low": float(low), "high": float(high), "n": n}


def comparison_table(models: dict[str, dict], comparison: dict[str, dict],
                     names: list[str]) -> tuple[list[str], list[dict]]:
    """Columns and rows for the terminal: a row per name (a score in each model's "metrics", or
    a field of the model's summary) for both models, their difference and its interval; rows
    with no value for either model are left out."""
    labels = {role: m["label"] for role, m in models.items()}
    columns = ["metric", *labels.values()]
    if "compare" in labels:
        columns += ["difference", "95% CI"]
    rows = []
    for name in names:
        row = {"metric": name}
        for role, label in labels.items():
            row[label] = _fmt(models[role]["metrics"].get(name, models[role].get(name)))
        c = comparison.get(name)
        if c and c["diff"] is not None:
            row["difference"] = f"{c['diff']:+.3f}"
            row["95% CI"] = f"[{c['low']:+.3f}, {c['high']:+.3f}]"
        if any(row.get(label) != "-" for label in labels.values()):
            rows.append(row)
    return columns, rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)
