"""Train/valid/test by hashing each example's content, cut at exact sizes.

Each kept example gets a seeded 64-bit score from its content. Once every example is known, they
are ranked by score and the lowest `test_fraction` go to test, the next `valid_fraction` to valid,
the rest to train: the sizes are exact, and membership depends only on content and seed (not on
file order); a duplicate has its twin's score and is dropped before it is ranked.

Prepare streams, so this takes two passes: the first appends kept lines to a spool file and keeps
only their scores (8 bytes an example, beside the 16-21 of the fingerprint set); the second reads
the spool and writes each line to its split.
"""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path

SPLITS = ("train", "valid", "test")


def digest_example(line: bytes, seed: int) -> tuple[int, int]:
    """(64-bit fingerprint for deduplication, 64-bit score that ranks it for the split) of one
    serialised example."""
    digest = hashlib.blake2b(line, digest_size=16, key=seed.to_bytes(8, "little", signed=True)
                             ).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def split_sizes(n: int, valid_fraction: float, test_fraction: float) -> tuple[dict, list[str]]:
    """({split: examples} summing to `n`, notes): each fraction rounded to the nearest count; a
    split asked for but rounded to nothing gets one example while train keeps at least one."""
    sizes = {"test": int(n * test_fraction + 0.5), "valid": int(n * valid_fraction + 0.5)}
    notes = []
    for split, fraction in (("test", test_fraction), ("valid", valid_fraction)):
        # Training needs a validation set, so small data still gets one (and a test example).
        if fraction > 0 and sizes[split] == 0 and n - sizes["test"] - sizes["valid"] > 1:
            sizes[split] = 1
            notes.append(f"{fraction:g} of {n} examples rounds to none: gave {split} 1 example")
    sizes["train"] = n - sizes["test"] - sizes["valid"]
    return {s: sizes[s] for s in SPLITS}, notes


def assign_splits(scores: array, sizes: dict) -> "numpy.ndarray":  # noqa: F821
    """The split index (into SPLITS) of each example, in spool order: ranked by score, lowest
    first into test, then valid, then train."""
    import numpy as np

    # A stable sort breaks a (2^-64 likely) score tie by position, so the sizes stay exact.
    order = np.argsort(np.frombuffer(scores, dtype=np.uint64), kind="stable")
    labels = np.zeros(len(scores), dtype=np.uint8)
    n_test, n_valid = sizes["test"], sizes["valid"]
    labels[order[:n_test]] = SPLITS.index("test")
    labels[order[n_test:n_test + n_valid]] = SPLITS.index("valid")
    return labels


def write_splits(spool: Path, labels, folder: Path) -> None:
    """Stream the spool's lines into folder/{train,valid,test}.jsonl by their labels, then delete
    the spool."""
    outs = [open(folder / f"{s}.jsonl", "wb", buffering=1 << 20) for s in SPLITS]
    try:
        with open(spool, "rb") as f:
            # Iterating bytes gives small ints without a list of them: memory stays flat.
            for label, line in zip(labels.tobytes(), f):
                outs[label].write(line)
    finally:
        for out in outs:
            out.close()
    spool.unlink()
