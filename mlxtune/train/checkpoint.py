"""Adapters and full checkpoints on disk, always written atomically.

A checkpoint holds what a resumed run needs to continue exactly as if it had never stopped: the
adapter weights, the optimizer state (moments, step, learning rate) and the loop's own counters.
Data order and dropout are pure functions of (seed, step), so the step number is the data
position and the random state.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxtune.atomic import atomic_folder, remove_folder, remove_stale, write_file
from mlxtune.errors import MlxtuneError

ADAPTERS = "adapters.safetensors"
KEEP_CHECKPOINTS = 2


def save_adapters(path: Path, model: nn.Module) -> None:
    """The trainable weights as mlx-lm's adapters.safetensors, replaced atomically."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    write_file(Path(path), lambda tmp: mx.save_safetensors(str(tmp), weights))


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, loop: dict) -> Path:
    """Write checkpoints/step-NNNNNNN and drop the oldest beyond KEEP_CHECKPOINTS."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    with atomic_folder(final) as tmp:
        mx.save_safetensors(str(tmp / ADAPTERS), dict(tree_flatten(model.trainable_parameters())))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"),
                            dict(tree_flatten(optimizer.state)))
        # state.json marks a whole checkpoint (list_checkpoints), so it is written last.
        (tmp / "state.json").write_text(json.dumps({"step": step, **loop}, indent=2))
    # The older ones go only once the new one is in place: a full disk keeps the last good one.
    remove_stale(root / "step-*")  # temp folders of runs killed while saving another step
    for old in list_checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
        remove_folder(old)  # rmtree alone, killed half-way, would leave a step-* without state.json
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def load_checkpoint(path: Path, model: nn.Module, optimizer) -> dict:
    """Restore adapters and optimizer state from checkpoint `path`; returns the loop state."""
    try:
        state = json.loads((path / "state.json").read_text())
        model.load_weights(str(path / ADAPTERS), strict=False)
        optimizer.init(model.trainable_parameters())
        optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    except (OSError, ValueError, KeyError) as e:
        raise MlxtuneError(f"{path}: cannot resume from this checkpoint: {e}") from None
    return state
