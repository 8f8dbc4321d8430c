"""The training loop: a compiled step, the loss and the batches passed in, one hook per update."""

from __future__ import annotations

import inspect
from functools import partial
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_map

from mlxtune.fastpath import token_losses

# Trained positions are passed in multiples of this, so a run compiles its step for a few row
# counts, not one per batch.
ROW_BUCKET = 64


def masked_loss(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array,
                rows: mx.array | None = None):
    """Mean cross-entropy over the tokens whose mask is 1, and how many there were. `rows`
    (from trained_rows) lets the model compute the loss at those positions only."""
    if rows is None:
        ce = token_losses(model, inputs, targets) * mask
    else:
        ce = token_losses(model, inputs, targets, rows) * mask.reshape(-1)[rows]
    ntoks = mask.sum()
    return ce.sum() / mx.maximum(ntoks, 1), ntoks


def trained_rows(mask: mx.array) -> mx.array | None:
    """The flat positions whose mask is set, padded with an untrained position (weight 0) to a
    multiple of ROW_BUCKET; None when every position is trained (nothing to skip)."""
    flat = np.asarray(mask).reshape(-1) != 0
    picked = np.flatnonzero(flat)
    if picked.size == flat.size:
        return None
    size = min(flat.size, max(ROW_BUCKET, -(-picked.size // ROW_BUCKET) * ROW_BUCKET))
    rows = np.full(size, np.flatnonzero(~flat)[0], dtype=np.int32)
    rows[:picked.size] = picked
    return mx.array(rows)


def _call(loss: Callable, model, inputs, targets, mask, rows):
    return (loss(model, inputs, targets, mask) if rows is None
            else loss(model, inputs, targets, mask, rows=rows))


def _rows_for(loss: Callable) -> Callable:
    """mask -> rows for a loss that takes `rows`, else mask -> None."""
    takes_rows = "rows" in inspect.signature(loss).parameters
    return trained_rows if takes_rows else (lambda mask: None)


def _all_sum(tree):
    """Every array in `tree` summed across ranks (unchanged in a single process)."""
    return tree_map(lambda x: mx.distributed.all_sum(x, stream=mx.cpu), tree)


def _parts(out) -> tuple:
    # A loss returns (value, count) or (value, count, {name: mean over the count}).
    return out[0], out[1], (out[2] if len(out) > 2 else {})


def evaluate_with_stats(model: nn.Module, batches, loss: Callable = masked_loss
                        ) -> tuple[float, dict[str, float]]:
    """Count-weighted mean loss over `batches` of (inputs, targets, mask), and the same mean of
    each statistic the loss returns, summed across ranks, in eval mode (no dropout); the model's
    mode is restored after."""
    training = model.training
    model.eval()
    rows_for = _rows_for(loss)
    total, count, sums = mx.array(0.0), mx.array(0.0), {}
    for inputs, targets, mask in batches:
        value, n, stats = _parts(_call(loss, model, inputs, targets, mask, rows_for(mask)))
        total, count = total + value * n, count + n
        sums = {k: sums.get(k, 0.0) + v * n for k, v in stats.items()}
        mx.eval(total, count, sums)
    model.train(training)
    total, count, sums = _all_sum((total, count, sums))
    count = mx.maximum(count, 1)
    return (total / count).item(), {k: (v / count).item() for k, v in sums.items()}


def evaluate(model: nn.Module, batches, loss: Callable = masked_loss) -> float:
    """Token-weighted (count-weighted) mean loss over `batches`; see evaluate_with_stats."""
    return evaluate_with_stats(model, batches, loss)[0]


def token_count(mask: mx.array) -> mx.array:
    """How many trained tokens a batch holds: what the SFT loss averages over."""
    return mask.sum()


def train(model: nn.Module, optimizer, batches: Iterator, total_steps: int, *,
          loss: Callable = masked_loss, count: Callable = token_count, accumulation: int = 1,
          start_step: int = 0, seed: int = 0, on_step: Callable | None = None) -> int:
    """Run optimizer updates start_step+1 .. total_steps, each from `accumulation` micro-batches.

    `batches` yields (index, inputs, targets, mask). `loss` returns a mean over `count(mask)`
    units (tokens for SFT, pairs for preference losses) and that count, and optionally a dict
    of statistics; a `loss` that takes `rows` also gets the trained positions (trained_rows), so
    it may skip the others. Each update's gradient is the mean over every unit of all its
    micro-batches on all ranks, so accumulation and data parallelism are exactly a bigger batch.
    After every update `on_step(step, loss, ntoks, stats)` is called with that update's mean
    loss, its trained tokens and its mean statistics; if it returns True, training stops there.
    Returns the last step done.
    """
    state = [model.state, optimizer.state, mx.random.state]
    world = mx.distributed.init().size()
    rows_for = _rows_for(loss)

    def objective(model, inputs, targets, mask, norm, rows):
        value, n, stats = _parts(_call(loss, model, inputs, targets, mask, rows))
        return value * n / norm, value, n, stats

    value_and_grad = nn.value_and_grad(model, objective)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets, mask, norm, rows, prev_grad, do_update):
        (_, value, n, stats), grad = value_and_grad(model, inputs, targets, mask, norm, rows)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            # average_gradients divides by the world size, which `norm` already multiplied in.
            optimizer.update(model, average_gradients(grad))
            grad = None
        return value, n, stats, grad

    model.train()
    done = start_step
    for done in range(start_step + 1, total_steps + 1):
        micro = [next(batches)[1:] for _ in range(accumulation)]
        tokens = mx.distributed.all_sum(sum(m.sum() for _, _, m in micro), stream=mx.cpu)
        units = mx.distributed.all_sum(sum(count(m) for _, _, m in micro), stream=mx.cpu)
        norm = mx.maximum(units, 1) / world
        # Dropout's randomness as a function of (seed, step): a resumed run draws the same masks.
        mx.random.seed(seed * 1_000_003 + done)
        grad, weighted, sums = None, mx.array(0.0), {}
        for i, (inputs, targets, mask) in enumerate(micro):
            value, n, stats, grad = step(inputs, targets, mask, norm, rows_for(mask), grad,
                                         i == accumulation - 1)
            weighted = weighted + value * n
            sums = {k: sums.get(k, 0.0) + v * n for k, v in stats.items()}
            # Evaluate per micro-batch so at most one graph's activations are alive.
            mx.eval(state, weighted, sums, grad)
        weighted, sums = _all_sum((weighted, sums))
        units = mx.maximum(units, 1)
        if on_step is not None and on_step(done, (weighted / units).item(), int(tokens.item()),
                                           {k: (v / units).item() for k, v in sums.items()}):
            break
    return done
