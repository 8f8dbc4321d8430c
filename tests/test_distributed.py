"""Data-parallel training with mlx.launch: 2 ranks on loopback equal one process with the same
global batch, and only rank 0 writes the run folder."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlxtune.train.config import launch_command, load_train_config
from mlxtune.train.run import run_training
from tests.adapters import train_config as _config

# Ranks against one process: rerun per compute variant (test.sh --variants).
pytestmark = pytest.mark.numerics


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, tiny_qmodel_dir):
    common = dict(iters=3, steps_per_report=1, steps_per_eval=3, save_every=3,
                  lora_parameters={"rank": 4, "scale": 2.0})
    single = _config(tmp_path / "single", tiny_qmodel_dir, batch_size=4, **common)
    double = _config(tmp_path / "double", tiny_qmodel_dir, batch_size=2, **common)
    assert subprocess.run([sys.executable, "-m", "mlxtune", "train", str(single)],
                          capture_output=True, timeout=600).returncode == 0
    proc = subprocess.run([sys.executable, "-m", "mlxtune", "train", str(double), "-n", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "world size 2, global batch 4" in proc.stdout
    assert proc.stdout.count("finished at step 3") == 1  # rank 1 prints nothing
    a, b = _metrics(tmp_path / "single" / "run"), _metrics(tmp_path / "double" / "run")
    # Written once: one row per report, not one per rank.
    assert [r["step"] for r in b] == [0, 1, 2, 3, 3]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    first = [r["train_loss"] for r in a if r["step"] == 1] + [r["train_loss"] for r in b
                                                               if r["step"] == 1]
    assert abs(first[0] - first[1]) < 1e-4
    np.testing.assert_allclose([r.get("train_loss", r.get("val_loss")) for r in a],
                               [r.get("train_loss", r.get("val_loss")) for r in b], atol=1e-4)
    wa = mx.load(str(tmp_path / "single" / "run" / "adapters.safetensors"))
    wb = mx.load(str(tmp_path / "double" / "run" / "adapters.safetensors"))
    for k in wa:
        # Three Adam steps amplify float noise in near-zero gradients: close, not bitwise.
        np.testing.assert_allclose(np.array(wa[k]), np.array(wb[k]), rtol=1e-3, atol=1e-4)


def test_accumulation_equals_the_bigger_batch(tmp_path, tiny_qmodel_dir):
    quiet = dict(say=lambda s: None)
    common = dict(iters=2, steps_per_report=1, steps_per_eval=2)
    big = run_training(_config(tmp_path / "big", tiny_qmodel_dir, batch_size=8, **common), **quiet)
    acc = run_training(_config(tmp_path / "acc", tiny_qmodel_dir, batch_size=4,
                               grad_accumulation_steps=2, **common), **quiet)
    losses = [[r["train_loss"] for r in _metrics(res.run_dir) if "train_loss" in r]
              for res in (big, acc)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


@pytest.mark.parametrize("section, expected", [
    ({"hosts": ["mac1.local", "mac2.local"]}, ["--hosts", "mac1.local,mac2.local", "-n", "1"]),
    ({"processes_per_host": 2, "backend": "mpi"}, ["mpi", "-n", "2"]),
    ({"hostfile": "hosts.json"}, ["--hostfile", "hosts.json"]),
])
def test_distributed_section_builds_an_mlx_launch_command(section, expected, monkeypatch):
    monkeypatch.delenv("MLX_RANK", raising=False)
    config = load_train_config(None, [f"distributed={json.dumps(section)}"])
    cmd = launch_command(config, ["c.yaml"])
    joined = " ".join(cmd)
    assert " ".join(expected) in joined and joined.endswith("-m mlxtune train c.yaml")
    monkeypatch.setenv("MLX_RANK", "0")  # already a launched rank: train here
    assert launch_command(config, ["c.yaml"]) is None
