"""Train/valid/test by hashing each example's content: deterministic for a seed, independent of
file order, and a duplicate always lands where its twin did (and is then dropped)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SPLITS = ("train", "valid", "test")


def digest_example(line: bytes, seed: int) -> tuple[int, float]:
    """(64-bit fingerprint for deduplication, a score in [0, 1) that picks the split) of one
    serialised example."""
    digest = hashlib.blake2b(line, digest_size=16, key=seed.to_bytes(8, "little", signed=True)
                             ).digest()
    return (int.from_bytes(digest[:8], "little"),
            int.from_bytes(digest[8:], "little") / 2.0**64)


def pick_split(score: float, valid_fraction: float, test_fraction: float) -> str:
    """The split an example with this score belongs to: test, then valid, then train, by band."""
    if score < test_fraction:
        return "test"
    if score < test_fraction + valid_fraction:
        return "valid"
    return "train"


def move_lines(folder: Path, src: str, moves: dict[int, str]) -> None:
    """Move the lines numbered in `moves` (0-based) from `src`.jsonl to the splits they name,
    rewriting `src` in one streaming pass."""
    path = folder / f"{src}.jsonl"
    tmp = path.with_suffix(".moving")
    outs = {split: open(folder / f"{split}.jsonl", "ab") for split in set(moves.values())}
    try:
        with open(path, "rb") as f, open(tmp, "wb") as keep:
            for i, line in enumerate(f):
                (outs[moves[i]] if i in moves else keep).write(line)
    finally:
        for out in outs.values():
            out.close()
    os.replace(tmp, path)
