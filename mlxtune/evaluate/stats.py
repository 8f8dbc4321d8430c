"""Paired bootstrap confidence intervals: is model A really better than model B on these prompts?"""

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
