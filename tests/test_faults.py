"""Faults while writing: a SIGKILL at a random moment, or a full disk, leaves every output either
as it was or whole and new, never a partial folder (issue #21).

Each kill test runs the real command in a subprocess on the tiny model: once uninterrupted (the
"new" output, and how long the command takes), then killed after a few seeded random delays
spread over that time, each time starting from the same "old" output. Most kills land outside the
short write itself; what is checked holds wherever they land. The full-disk tests mount a small
tmpfs (root only) and fill it at the moment that matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlxtune.errors import MlxtuneError

KILLS = 3  # seeded delays per command: with the uninterrupted run, ~15 s a command here
SEED = 21


def snapshot(folder: Path) -> dict | None:
    """{relative path: sha256} of every file under `folder` (None when it does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _mlxtune(*args) -> list[str]:
    return [sys.executable, "-m", "mlxtune", *map(str, args)]


def _run_killed(cmd: list[str], delay: float) -> bool:
    """Run `cmd`, SIGKILL it after `delay` seconds; True if it was killed (not finished)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def _reference(cmd: list[str]) -> float:
    """Run `cmd` to the end (it must succeed); returns how long it took."""
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - start


def check_kills_leave_old_or_new(cmd: list[str], out: Path, make_old, seed: int) -> None:
    """`out` after `cmd` is killed at random moments is exactly the old output or exactly the
    new one; the next writer removes the killed one's hidden temp folder."""
    make_old()
    old = snapshot(out)
    duration = _reference(cmd)
    new = snapshot(out)
    assert new and new != old
    rng = random.Random(seed)
    for _ in range(KILLS):
        shutil.rmtree(out, ignore_errors=True)
        make_old()
        delay = rng.uniform(0.3, 1.1) * duration
        _run_killed(cmd, delay)
        state = snapshot(out)
        assert state == old or state == new, f"partial output after a kill at {delay:.2f}s"
    # A finished run leaves no temp sibling behind, its own or a killed run's.
    _reference(cmd)
    assert snapshot(out) == new
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def test_killed_prepare_leaves_the_old_splits_or_the_new(tmp_path):
    from mlxtune.prepare import PrepareOptions, prepare_dataset

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"instruction": f"question {i} " * 5,
                                       "output": f"answer {i} " * 20}) + "\n"
                           for i in range(3000)))
    out = tmp_path / "ready"
    check_kills_leave_old_or_new(_mlxtune("prepare", raw, "--out", out, "--seed", 1), out,
                                 lambda: prepare_dataset([raw], out, PrepareOptions(seed=0)),
                                 SEED)


def test_killed_convert_leaves_the_old_model_or_the_new(tmp_path, tiny_model_dir):
    from mlxtune.models.convert import convert_model

    out = tmp_path / "converted"
    check_kills_leave_old_or_new(_mlxtune("models", "convert", tiny_model_dir, "--out", out,
                                          "--quantize", 4, "--group-size", 32), out,
                                 lambda: convert_model(str(tiny_model_dir), out, 8, 32),
                                 SEED + 1)


def _random_adapter(folder: Path, model_dir: Path, seed: int = 0) -> Path:
    """A LoRA adapter folder for `model_dir` with random (non-zero) weights on every block."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    model.freeze()
    mx.random.seed(seed)
    settings = {"rank": 4, "scale": 2.0, "dropout": 0.0}
    linear_to_lora_layers(model, len(model.layers), settings)
    weights = {k: mx.random.normal(v.shape) * 0.05
               for k, v in tree_flatten(model.trainable_parameters())}
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": len(model.layers), "lora_parameters": settings,
         "model": str(model_dir)}))
    return folder


def test_killed_fuse_leaves_the_old_model_or_the_new(tmp_path, tiny_qmodel_dir):
    from mlxtune.fuse import fuse

    adapter = _random_adapter(tmp_path / "adapter", tiny_qmodel_dir)
    out = tmp_path / "fused"
    check_kills_leave_old_or_new(_mlxtune("fuse", "--adapter", adapter, "--out", out), out,
                                 lambda: fuse(out, adapter=adapter, dequantize=True,
                                              say=lambda s: None), SEED + 2)


def _complete_checkpoint(folder: Path, keys: set[str]) -> None:
    state = json.loads((folder / "state.json").read_text())
    assert folder.name == f"step-{state['step']:07d}"
    assert set(mx.load(str(folder / "adapters.safetensors"))) == keys
    assert mx.load(str(folder / "optimizer.safetensors"))


def test_killed_training_leaves_only_whole_checkpoints(tmp_path, tiny_qmodel_dir):
    from tests.adapters import train_config

    config = train_config(tmp_path, tiny_qmodel_dir, iters=8, save_every=1, steps_per_eval=100,
                          steps_per_report=100)
    run = tmp_path / "run"
    duration = _reference(_mlxtune("train", config))
    keys = set(mx.load(str(run / "adapters.safetensors")))
    rng = random.Random(SEED + 3)
    for _ in range(KILLS):
        shutil.rmtree(run)
        _run_killed(_mlxtune("train", config), rng.uniform(0.3, 1.1) * duration)
        for folder in (run / "checkpoints").glob("*") if run.exists() else []:
            if folder.name.startswith("."):
                continue  # a temp folder: never listed, removed by the next save
            _complete_checkpoint(folder, keys)
        if (run / "adapters.safetensors").exists():
            assert set(mx.load(str(run / "adapters.safetensors"))) == keys
        if (run / "adapter_config.json").exists():
            json.loads((run / "adapter_config.json").read_text())
    # The next checkpoint removes whatever temp folder a killed save left, whatever its step.
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlxtune.train.checkpoint import save_checkpoint

    (run / "checkpoints" / ".step-0000003.partial-999999999").mkdir(parents=True, exist_ok=True)
    optimizer = optim.Adam(learning_rate=0.1)
    optimizer.init((model := nn.Linear(2, 2)).trainable_parameters())
    save_checkpoint(run, 99, model, optimizer, {})
    assert [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs at tmp_path/disk (needs root and a kernel that lets us mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> None:
    """Write a filler file on `disk` until no byte is left."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == 28  # ENOSPC
    finally:
        os.close(fd)


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(small_disk, tmp_path,
                                                                 tiny_qmodel_dir):
    from mlxtune.train.run import run_training
    from tests.adapters import train_config

    config = train_config(tmp_path, tiny_qmodel_dir, iters=2, save_every=2, steps_per_eval=100,
                          steps_per_report=100, adapter_path=str(small_disk / "run"))
    run_training(config, say=lambda s: None)
    run = small_disk / "run"
    last = run / "checkpoints" / "step-0000002"
    before = snapshot(last)

    def fill_once_started(line: str) -> None:
        if line.startswith("training "):  # config and adapter config are written by now
            fill(small_disk)

    with pytest.raises(MlxtuneError) as e:
        run_training(config, ["iters=4", "save_every=1"], resume=True, say=fill_once_started)
    message = str(e.value)
    assert "\n" not in message and message.startswith("step 3: cannot save a checkpoint: ")
    assert f"the last good checkpoint is {last}" in message
    assert snapshot(last) == before
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]
    assert not [p for p in run.iterdir() if ".partial-" in p.name]
    (small_disk / "filler").unlink()
    result = run_training(config, ["iters=4", "save_every=1"], resume=True, say=lambda s: None)
    assert result.steps == 4  # and the run goes on from it once there is room again


def test_a_full_disk_during_fuse_is_one_line_and_keeps_the_old_model(small_disk, tmp_path,
                                                                     tiny_qmodel_dir):
    from mlxtune.fuse import fuse
    from tests.test_cli import assert_one_line_error, invoke

    adapter = _random_adapter(tmp_path / "adapter", tiny_qmodel_dir)
    out = small_disk / "fused"
    fuse(out, adapter=adapter, say=lambda s: None)
    before = snapshot(out)
    fill(small_disk)
    result = invoke("fuse", "--adapter", adapter, "--out", out, "--dequantize")
    assert_one_line_error(result, f"{out}: cannot write", quiet=False)
    assert snapshot(out) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "fused"]
