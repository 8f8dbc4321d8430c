"""Adapters and full checkpoints on disk, always written atomically.

A checkpoint holds what a resumed run needs to continue exactly as if it had never stopped: the
adapter weights, the optimizer state (moments, step, learning rate) and the loop's own counters.
Data order and dropout are pure functions of (seed, step), so the step number is the data
position and the random state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxtune.errors import MlxtuneError

ADAPTERS = "adapters.safetensors"
KEEP_CHECKPOINTS = 2


def _atomic_write(path: Path, write) -> None:
    # Keep the suffix: mx.save_safetensors appends ".safetensors" to names without it.
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def save_adapters(path: Path, model: nn.Module) -> None:
    """The trainable weights as mlx-lm's adapters.safetensors, replaced atomically."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    _atomic_write(Path(path), lambda tmp: mx.save_safetensors(str(tmp), weights))


def write_json(path: Path, data: dict) -> None:
    """JSON to `path`, replaced atomically."""
    _atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2)))


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, loop: dict) -> Path:
    """Write checkpoints/step-NNNNNNN and drop the oldest beyond KEEP_CHECKPOINTS."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / ADAPTERS), dict(tree_flatten(model.trainable_parameters())))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    # state.json last, then one rename: a folder without it, or a .partial one, is never used.
    (tmp / "state.json").write_text(json.dumps({"step": step, **loop}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
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
