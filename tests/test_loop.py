"""train()'s contract, seen with a stub model, a stub loss and stub batches (as mlx-lm's
tests/test_finetune.py drives its trainer): which steps run, what the hook is told, that
accumulation is exactly a bigger batch, that a hook can stop the run, that frozen weights stay."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from mlxtune.train.loop import train


class Scale(nn.Module):
    """y = w * x, with a frozen parameter beside w that no update may touch."""

    def __init__(self):
        super().__init__()
        self.w = mx.array(0.0)
        self.frozen = mx.array(5.0)

    def __call__(self, x):
        return self.w * x + 0 * self.frozen


def squared_error(model, inputs, targets, mask):
    """Mean squared error over the masked positions, and how many there were."""
    err = (model(inputs) - targets) ** 2 * mask
    n = mask.sum()
    return err.sum() / mx.maximum(n, 1), n


def stub_batches(n_batches: int, rows: int = 2, cols: int = 4, seed: int = 0) -> list:
    """(index, inputs, targets, mask) batches whose targets are 3 x inputs; some positions
    masked out (and given wrong targets there, so a leak of the mask would show)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_batches):
        x = rng.uniform(0.5, 1.5, (rows, cols)).astype(np.float32)
        mask = (rng.uniform(size=(rows, cols)) > 0.25).astype(np.float32)
        mask[0, 0] = 1.0
        y = np.where(mask > 0, 3 * x, -100.0).astype(np.float32)
        out.append((i, mx.array(x), mx.array(y), mx.array(mask)))
    return out


def _model():
    model = Scale()
    model.freeze(keys=["frozen"])
    return model


def test_steps_run_in_order_and_the_hook_gets_each_updates_mean_loss_and_tokens():
    model, data = _model(), stub_batches(5)
    calls = []
    done = train(model, optim.SGD(learning_rate=0.3), iter(data), 5, loss=squared_error,
                 on_step=lambda *a: calls.append(a))
    assert done == 5 and [c[0] for c in calls] == [1, 2, 3, 4, 5]
    assert [c[2] for c in calls] == [int(m.sum().item()) for _, _, _, m in data]
    # Step 1's loss is taken before its update, at w = 0: the mean of the masked targets squared.
    _, _, y, m = data[0]
    assert calls[0][1] == pytest.approx((mx.sum(y * y * m) / m.sum()).item(), rel=1e-6)
    assert calls[0][3] == {}
    losses = [c[1] for c in calls]
    assert losses[-1] < 0.1 * losses[0]  # w walks towards 3 (by far more than any rounding)
    assert 2.0 < model.w.item() < 3.5 and model.frozen.item() == 5.0


def test_accumulation_is_exactly_one_bigger_batch():
    data = stub_batches(2, rows=2)
    joined = (0, *(mx.concatenate([a[k] for a in data]) for k in (1, 2, 3)))
    one, two = _model(), _model()
    train(one, optim.SGD(learning_rate=0.05), iter([joined]), 1, loss=squared_error)
    seen = []
    train(two, optim.SGD(learning_rate=0.05), iter(data), 1, loss=squared_error,
          accumulation=2, on_step=lambda *a: seen.append(a))
    assert two.w.item() == pytest.approx(one.w.item(), rel=1e-5) and one.w.item() != 0.0
    assert seen[0][2] == int(joined[3].sum().item())


def test_a_hook_that_returns_true_stops_the_run_and_a_resumed_run_starts_after_start_step():
    model = _model()
    steps = []
    done = train(model, optim.SGD(learning_rate=0.05), iter(stub_batches(10)), 10,
                 loss=squared_error, on_step=lambda step, *_: steps.append(step) or step == 3)
    assert done == 3 and steps == [1, 2, 3]
    steps.clear()
    done = train(model, optim.SGD(learning_rate=0.05), iter(stub_batches(2)), 5, start_step=3,
                 loss=squared_error, on_step=lambda step, *_: steps.append(step))
    assert done == 5 and steps == [4, 5]


def test_a_loss_may_return_statistics_and_the_hook_gets_their_means():
    def with_stats(model, inputs, targets, mask):
        value, n = squared_error(model, inputs, targets, mask)
        return value, n, {"w": model.w * 1.0}

    stats = []
    train(_model(), optim.SGD(learning_rate=0.0), iter(stub_batches(2)), 2, loss=with_stats,
          on_step=lambda *a: stats.append(a[3]))
    assert stats == [{"w": 0.0}, {"w": 0.0}]
