"""mlxtune train on a tiny random llama: learning, masking, resume after SIGKILL, NaN, dry run.

Training tests assert what holds on every CPU (the loss falls by a wide factor at a learning rate
where the run is stable; stock mlx-lm sees what we saved), never an exact answer after a few
steps: at 5e-3 this run's final loss was 1.8, 2.4 or 3.3 depending on the BLAS kernel alone."""

import json
import signal
import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
import pytest

from mlxtune.errors import DataError, MlxtuneError
from mlxtune.train.data import tokenize_chat
from mlxtune.train.run import run_training
from tests.adapters import train_config as _config

# Losses of real training runs: rerun per compute variant (test.sh --variants).
pytestmark = pytest.mark.numerics


def _val_losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def _answer_loss(model, tokenizer, data_file) -> float:
    """Mean cross-entropy over the assistant tokens of a chat JSONL, computed here with plain MLX."""
    total = count = 0.0
    for line in data_file.read_text().splitlines():
        ex = tokenize_chat(tokenizer, json.loads(line)["messages"], mask_prompt=True)
        tokens, mask = mx.array(ex.tokens), mx.array(ex.loss_mask[1:])
        logits = model(tokens[None, :-1])[0].astype(mx.float32)
        losses = nn.losses.cross_entropy(logits, tokens[1:]) * mask
        total += losses.sum().item()
        count += mask.sum().item()
    return total / count


def test_qlora_lowers_val_loss_and_stock_mlx_lm_loads_what_it_learned(tmp_path, tiny_qmodel_dir):
    from mlx_lm import load

    result = run_training(_config(tmp_path, tiny_qmodel_dir), say=lambda s: None)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    (s0, v0), (s1, _), (s2, v2) = _val_losses(result.run_dir)
    assert (s0, s1, s2) == (0, 20, 40)
    assert v2 < 0.5 * v0  # 5.97 -> 1.64 on every variant tried; chance would stay near ln(323)
    assert all(set(r) <= {"step", "train_loss", "val_loss", "learning_rate", "tokens_per_sec",
                          "peak_memory_gb"} for r in rows)
    for name in ("adapters.safetensors", "adapter_config.json", "config.yaml", "loss.png",
                 "best/adapters.safetensors"):
        assert (result.run_dir / name).is_file(), name
    # Stock mlx-lm loads the run folder as an adapter, and by its own forward pass the adapter
    # has learned the validation answers: what we saved is what we trained.
    valid = tmp_path / "data" / "valid.jsonl"
    tuned, tokenizer = load(str(tiny_qmodel_dir), adapter_path=str(result.run_dir))
    base, _ = load(str(tiny_qmodel_dir))
    tuned_loss = _answer_loss(tuned, tokenizer, valid)
    assert tuned_loss < 0.5 * _answer_loss(base, tokenizer, valid)
    assert tuned_loss == pytest.approx(v2, rel=0.05)


def test_mask_covers_every_assistant_turn_and_its_end_token(tiny_model_dir):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "alpha"},
                {"role": "user", "content": "two"}, {"role": "assistant", "content": "bravo"}]
    ex = tokenize_chat(tok, messages, mask_prompt=True)
    trained = tok.decode([t for t, m in zip(ex.tokens.tolist(), ex.loss_mask) if m])
    assert trained == "alpha<|im_end|>\nbravo<|im_end|>\n"
    assert tokenize_chat(tok, messages, mask_prompt=False).loss_mask.all()


def test_dora_and_full_train_lower_the_loss_and_move_their_weights(tmp_path, tiny_model_dir):
    from mlx_lm import load

    base, _ = load(str(tiny_model_dir))
    base_weights = dict(tree_flatten(base.parameters()))
    # num_layers 1: only the last of the two blocks trains; block 0, the embeddings and the norm
    # outside the blocks stay frozen, so they are neither saved nor changed.
    last = "model.layers.1."
    linears = {k[: -len(".weight")] for k, v in base_weights.items()
               if k.startswith(last) and k.endswith(".weight") and v.ndim == 2}
    for kind in ("dora", "full"):
        result = run_training(_config(tmp_path / kind, tiny_model_dir, fine_tune_type=kind,
                                      iters=10, steps_per_eval=10, num_layers=1),
                              say=lambda s: None)
        cfg = json.loads((result.run_dir / "adapter_config.json").read_text())
        assert cfg["fine_tune_type"] == kind and result.steps == 10
        (_, v0), (_, v1) = _val_losses(result.run_dir)
        assert v1 < 0.7 * v0  # a wide margin: 6.0 -> ~2 on every variant tried
        saved = mx.load(str(result.run_dir / "adapters.safetensors"))
        if kind == "dora":
            assert set(saved) == {f"{n}.{p}" for n in linears for p in ("lora_a", "lora_b", "m")}
            # lora_b starts at zero and each magnitude m at its weight's row norms: all moved.
            moved = [k for k, v in saved.items()
                     if (k.endswith("lora_b") and mx.abs(v).max().item() > 0)
                     or (k.endswith(".m") and not mx.allclose(
                         v, mx.linalg.norm(base_weights[k[:-2] + ".weight"], axis=1)))]
            assert len(moved) == 2 * len(linears)
        else:  # every weight of the trained block is saved, and every one moved
            assert set(saved) == {k for k in base_weights if k.startswith(last)}
            assert all(not mx.allclose(v, base_weights[k]) for k, v in saved.items())


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


def test_memory_plan_drops_the_attention_matrix_where_the_kernel_keeps_none(tmp_path,
                                                                           tiny_qmodel_dir,
                                                                           monkeypatch):
    """On the CPU path mlxtune's attention kernel keeps one log-sum-exp a row, not a heads x t x t
    matrix a block (MLX's attention, and every other backend, still do): its activations grow
    with the length, the others' faster."""
    from mlxtune import kernels
    from mlxtune.train.config import load_train_config
    from mlxtune.train.memory import plan_memory

    if kernels.attention_train is None:
        pytest.skip(kernels.status())

    def plans(t):
        cfg = load_train_config(_config(tmp_path, tiny_qmodel_dir), [f"max_seq_length={t}"])
        kernel_cpu, gpu = plan_memory(tiny_qmodel_dir, cfg, "cpu", 0), \
            plan_memory(tiny_qmodel_dir, cfg, "cuda", 0)
        with monkeypatch.context() as m:
            m.setattr(kernels, "attention_train", None)
            return kernel_cpu, gpu, plan_memory(tiny_qmodel_dir, cfg, "cpu", 0)

    (kernel_512, _, ops_512), (kernel_1024, gpu, ops_1024) = plans(512), plans(1024)
    assert kernel_1024.activations == 2 * kernel_512.activations
    heads, t = 4, 1024  # tests/tiny.py's llama
    quadratic = (ops_1024.activations - 2 * ops_512.activations) // (t * t // 2)
    assert quadratic > 0 and quadratic % (heads * 4) == 0  # whole heads x t x t fp32 matrices
    assert ops_1024.peak - kernel_1024.peak > ops_1024.activations - kernel_1024.activations
    assert gpu.activations * 2 == ops_1024.activations  # fp16 there: the matrices stay counted


def test_memory_plan_counts_fp32_weights_only_where_they_exist(tmp_path, tiny_qmodel_dir,
                                                              monkeypatch):
    """On the CPU path kernels.dequant_matmul de-quantizes into register-tile blocks: no weight
    exists in fp32 and the loss holds only its logits. With the BLAS route instead, the biggest
    weight is de-quantized whole (forward and backward) and the fused loss's head in vocabulary
    chunks; with MLX's ops for de-quantizing too, the whole head again."""
    from mlxtune import kernels
    from mlxtune.models.folder import read_config
    from mlxtune.train.config import load_train_config
    from mlxtune.train.memory import plan_memory

    if kernels.dequant_matmul is None:
        pytest.skip(kernels.status())
    cfg = load_train_config(_config(tmp_path, tiny_qmodel_dir), [])
    kernel = plan_memory(tiny_qmodel_dir, cfg, "cpu", 0)
    monkeypatch.setattr(kernels, "dequant_matmul", None)
    blas = plan_memory(tiny_qmodel_dir, cfg, "cpu", 0)
    monkeypatch.setattr(kernels, "dequantize", None)
    ops = plan_memory(tiny_qmodel_dir, cfg, "cpu", 0)
    model = read_config(tiny_qmodel_dir)
    vocab, h, inter = model["vocab_size"], model["hidden_size"], model["intermediate_size"]
    assert vocab > inter and kernel.activations == blas.activations == ops.activations
    assert ops.logits == blas.logits
    # The scratch: none, then the MLP's weight (the biggest but the head) twice in fp32, then
    # the head's twice.
    assert blas.peak - kernel.peak == blas.logits - kernel.logits + 2 * 4 * h * inter
    assert ops.peak - blas.peak == 2 * 4 * h * (vocab - inter)


def test_missing_data_is_reported_before_loading(tmp_path, tiny_qmodel_dir):
    path = _config(tmp_path, tiny_qmodel_dir)
    (tmp_path / "data" / "valid.jsonl").unlink()
    with pytest.raises(MlxtuneError, match="valid.jsonl: missing"):
        run_training(path, say=lambda s: None)


@pytest.mark.parametrize("bad_line, error", [
    ('{"messages": [{"role": "user"', r"train.jsonl:5: not valid JSON"),
    ('["a list"]', r"train.jsonl:5: expected a JSON object"),
    ('{"question": "q"}', r"train.jsonl:5: expected mlx-lm's chat"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}', r"train.jsonl:5: holds preference pairs"),
])
def test_every_line_of_the_data_is_checked_before_the_model_is_looked_up(tmp_path, bad_line,
                                                                          error):
    # The model does not exist: the data error must come first, so the data was read first.
    path = _config(tmp_path, tmp_path / "no-such-model")
    train = tmp_path / "data" / "train.jsonl"
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[:4] + [bad_line] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=error):
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


def test_a_run_the_plan_says_cannot_fit_is_refused_before_loading(tmp_path, tiny_qmodel_dir,
                                                                   monkeypatch):
    import mlxtune.platform

    monkeypatch.setattr(mlxtune.platform, "available_memory", lambda: 1 << 20)  # 1 MB
    config = _config(tmp_path, tiny_qmodel_dir, iters=1, steps_per_eval=1)
    with pytest.raises(MlxtuneError) as e:
        run_training(config, say=lambda s: None)
    message = str(e.value)
    assert "\n" not in message and "more than the 0.00 GB available" in message
    assert "lower batch_size (4) or max_seq_length" in message and "--force" in message
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert run_training(config, say=lambda s: None, force=True).steps == 1
