"""`mlxtune train`: check the config, the data and the memory plan, then load, adapt and train.

Cheap checks come first (config, data files, memory plan), weights load only after they pass.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mlxtune.errors import MlxtuneError
from mlxtune.train.config import load_train_config, run_folder


@dataclass
class TrainResult:
    """What a finished (or stopped) run did."""

    run_dir: Path
    steps: int
    val_loss: float | None = None
    best_val_loss: float | None = None
    test_loss: float | None = None
    val_stats: dict = field(default_factory=dict)  # preference runs: the last val reward stats
    stopped: str = "finished"
    plan: list[str] = field(default_factory=list)


def run_training(config_path: str | Path | None, overrides: list[str] = (), resume: bool = False,
                 dry_run: bool = False, say=print, force: bool = False) -> TrainResult:
    """Train as `config_path` (plus overrides) says; with `dry_run`, check and plan only. A run
    the memory plan says cannot fit is refused before loading, unless `force`."""
    import mlx.core as mx

    from mlxtune.models.resolve import resolve_model
    from mlxtune.platform import available_memory, backend
    from mlxtune.train.data import check_data_folder
    from mlxtune.train.memory import GB, PLAN_ERROR, plan_memory

    config = load_train_config(config_path, overrides)
    run_dir = run_folder(config, config_path)
    need = ("train", "valid", "test") if config.test else ("train", "valid")
    files = check_data_folder(Path(config.data), need, config.training_mode)
    if resume and not dry_run:
        from mlxtune.train.checkpoint import list_checkpoints

        if not list_checkpoints(run_dir):
            raise MlxtuneError(f"{run_dir}: no checkpoint to resume from; run without --resume")
    world = mx.distributed.init()
    model_dir = resolve_model(config.model)
    plan = plan_memory(model_dir, config, backend(), available_memory(), world.size())
    lines = [f"memory plan for {config.model} on {backend()} (batch {config.batch_size} x "
             f"{config.max_seq_length} tokens, world size {world.size()}, global batch "
             f"{config.batch_size * world.size() * config.grad_accumulation_steps}):",
             *plan.lines(config)]
    if world.rank() == 0:
        for line in lines:
            say(line)
    result = TrainResult(run_dir=run_dir, steps=0, plan=lines)
    if dry_run:
        return result
    if not force and plan.available and plan.peak > plan.available * (1 + PLAN_ERROR):
        raise MlxtuneError(f"the memory plan predicts a peak of {plan.peak / GB:.2f} GB, more "
                           f"than the {plan.available / GB:.2f} GB available: {plan.lever(config)}"
                           " (or pass --force to start anyway)")
    if config.max_memory_gb:
        mx.set_memory_limit(int(config.max_memory_gb * 1024**3))
    from mlxtune.train.session import TrainingSession

    # What the frozen-layer cache may hold: the memory the plan leaves free, with a margin.
    spare = max(0, int((plan.available - plan.peak * (1 + PLAN_ERROR)) * 0.8)) \
        if plan.available else 0
    return TrainingSession(config, config_path, model_dir, files, world, say,
                           cache_bytes=spare).run(resume, result)


def launch_or_train(config_path: Path, overrides: list[str] = (), resume: bool = False,
                    dry_run: bool = False, hosts: str | None = None,
                    processes: int | None = None, force: bool = False) -> int:
    """Train here, or, for a distributed run not yet launched, start every rank with mlx.launch
    and return its exit code."""
    from mlxtune.train.config import launch_command

    overrides = list(overrides)
    if hosts or processes:
        overrides += [f"distributed.hosts=[{hosts or ''}]",
                      f"distributed.processes_per_host={processes or 1}"]
    if not dry_run:
        argv = [str(config_path), *(x for o in overrides for x in ("--set", o)),
                *(["--force"] if force else [])]
        launch = launch_command(load_train_config(config_path, overrides),
                                argv + (["--resume"] if resume else []))
        if launch:
            print(f"launching: {' '.join(launch)}", file=sys.stderr)
            return subprocess.call(launch)
    run_training(config_path, overrides, resume=resume, dry_run=dry_run, force=force)
    return 0
