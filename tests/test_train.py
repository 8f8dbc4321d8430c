"""mlxtune train on a tiny random llama: learning, masking, resume after SIGKILL, NaN, dry run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxtune.errors import MlxtuneError
from mlxtune.train.data import tokenize_chat
from mlxtune.train.run import run_training
from tests.adapters import write_data

ANSWER = '{"ok": true}'


def _write_data(folder: Path, n_train=32, n_valid=8):
    return write_data(folder, ANSWER, n_train, n_valid)


def _config(tmp_path, model_dir, **extra):
    config = {"model": str(model_dir), "data": str(_write_data(tmp_path / "data")),
              "adapter_path": str(tmp_path / "run"), "batch_size": 4, "iters": 40,
              "learning_rate": 5e-3, "num_layers": -1, "mask_prompt": True,
              "steps_per_report": 5, "steps_per_eval": 20, "save_every": 10, "val_batches": -1,
              "lora_parameters": {"rank": 8, "scale": 2.0}, **extra}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_qlora_lowers_val_loss_and_teaches_the_answer(tmp_path, tiny_qmodel_dir):
    from mlx_lm import generate, load

    result = run_training(_config(tmp_path, tiny_qmodel_dir), say=lambda s: None)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 20, 40]
    assert vals[-1] < 0.5 * vals[0]
    assert all(set(r) <= {"step", "train_loss", "val_loss", "learning_rate", "tokens_per_sec",
                          "peak_memory_gb"} for r in rows)
    for name in ("adapters.safetensors", "adapter_config.json", "config.yaml", "loss.png",
                 "best/adapters.safetensors"):
        assert (result.run_dir / name).is_file(), name
    # Stock mlx-lm loads the run folder as an adapter and now gives the trained answer.
    model, tokenizer = load(str(tiny_qmodel_dir), adapter_path=str(result.run_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "quick brown fox"}],
                                           add_generation_prompt=True, tokenize=False)
    assert generate(model, tokenizer, prompt, max_tokens=12).startswith(ANSWER)
    base, _ = load(str(tiny_qmodel_dir))
    assert not generate(base, tokenizer, prompt, max_tokens=12).startswith(ANSWER)


def test_mask_covers_every_assistant_turn_and_its_end_token(tiny_model_dir):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "alpha"},
                {"role": "user", "content": "two"}, {"role": "assistant", "content": "bravo"}]
    ex = tokenize_chat(tok, messages, mask_prompt=True)
    trained = tok.decode([t for t, m in zip(ex.tokens.tolist(), ex.loss_mask) if m])
    assert trained == "alpha<|im_end|>\nbravo<|im_end|>\n"
    assert tokenize_chat(tok, messages, mask_prompt=False).loss_mask.all()


def test_dora_and_full_train(tmp_path, tiny_model_dir):
    for kind in ("dora", "full"):
        result = run_training(_config(tmp_path / kind, tiny_model_dir, fine_tune_type=kind,
                                      iters=4, steps_per_eval=4), say=lambda s: None)
        cfg = json.loads((result.run_dir / "adapter_config.json").read_text())
        assert cfg["fine_tune_type"] == kind and result.steps == 4


def test_nan_loss_stops_with_a_clear_message(tmp_path, tiny_qmodel_dir):
    good = run_training(_config(tmp_path / "a", tiny_qmodel_dir, iters=2, steps_per_eval=2),
                        say=lambda s: None)
    weights = mx.load(str(good.run_dir / "adapters.safetensors"))
    bad = tmp_path / "nan.safetensors"
    mx.save_safetensors(str(bad), {k: v * float("nan") for k, v in weights.items()})
    with pytest.raises(MlxtuneError, match=r"step 1: the training loss is nan"):
        run_training(_config(tmp_path / "b", tiny_qmodel_dir, resume_adapter_file=str(bad)),
                     say=lambda s: None)


def test_dry_run_plans_without_loading(tmp_path, tiny_qmodel_dir, capsys):
    lines = []
    result = run_training(_config(tmp_path, tiny_qmodel_dir), dry_run=True, say=lines.append)
    assert result.steps == 0 and not (tmp_path / "run").exists()
    text = "\n".join(lines)
    for part in ("weights", "optimizer (adam)", "activations (without checkpointing)",
                 "(activations with checkpointing)", "predicted peak", "fits"):
        assert part in text


def test_missing_data_is_reported_before_loading(tmp_path, tiny_qmodel_dir):
    path = _config(tmp_path, tiny_qmodel_dir)
    (tmp_path / "data" / "valid.jsonl").unlink()
    with pytest.raises(MlxtuneError, match="valid.jsonl: missing"):
        run_training(path, say=lambda s: None)


def _train_cli(config, *extra):
    return subprocess.Popen([sys.executable, "-m", "mlxtune", "train", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_qmodel_dir):
    straight = _config(tmp_path / "straight", tiny_qmodel_dir, iters=30, save_every=5,
                       lora_parameters={"rank": 8, "scale": 2.0, "dropout": 0.1})
    killed = _config(tmp_path / "killed", tiny_qmodel_dir, iters=30, save_every=5,
                     lora_parameters={"rank": 8, "scale": 2.0, "dropout": 0.1})
    assert _train_cli(straight).wait(timeout=600) == 0
    proc = _train_cli(killed)
    checkpoints = tmp_path / "killed" / "run" / "checkpoints"
    deadline = time.time() + 600
    while not (checkpoints / "step-0000010" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _train_cli(killed, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "resuming" in out

    def metrics(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in rows]

    a, b = metrics(tmp_path / "straight" / "run"), metrics(tmp_path / "killed" / "run")
    assert [r[0] for r in a] == [r[0] for r in b]
    np.testing.assert_allclose([x for r in a for x in r[1:] if x is not None],
                               [x for r in b for x in r[1:] if x is not None], rtol=1e-5)
    wa = mx.load(str(tmp_path / "straight" / "run" / "adapters.safetensors"))
    wb = mx.load(str(tmp_path / "killed" / "run" / "adapters.safetensors"))
    for k in wa:
        np.testing.assert_allclose(np.array(wa[k]), np.array(wb[k]), rtol=1e-5, atol=1e-6)


def test_resume_without_checkpoint_is_a_user_error(tmp_path, tiny_qmodel_dir):
    with pytest.raises(MlxtuneError, match="no checkpoint to resume from"):
        run_training(_config(tmp_path, tiny_qmodel_dir), resume=True, say=lambda s: None)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_qmodel_dir):
    config = _config(tmp_path, tiny_qmodel_dir, iters=100000, save_every=100000,
                     steps_per_eval=100000)
    proc = _train_cli(config)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and "train_loss" in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert err.strip().startswith("error: interrupted at step") and "Traceback" not in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert (tmp_path / "run" / "checkpoints" / f"step-{step:07d}" / "state.json").is_file()
