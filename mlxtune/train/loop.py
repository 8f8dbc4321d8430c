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


def _rows_for(loss: Callable) -> Callable:
    """mask -> rows for a loss that takes `rows`, else mask -> None."""
    takes_rows = "rows" in inspect.signature(loss).parameters
    return trained_rows if takes_rows else (lambda mask: None)


def evaluate(model: nn.Module, batches, loss: Callable = masked_loss) -> float:
    """Token-weighted mean loss over `batches` of (inputs, targets, mask), summed across ranks,
    in eval mode (no dropout); the model's mode is restored after."""
    training = model.training
    model.eval()
    rows_for = _rows_for(loss)
    total, count = mx.array(0.0), mx.array(0.0)
    for inputs, targets, mask in batches:
        rows = rows_for(mask)
        value, ntoks = (loss(model, inputs, targets, mask) if rows is None
                        else loss(model, inputs, targets, mask, rows=rows))
        total, count = total + value * ntoks, count + ntoks
        mx.eval(total, count)
    model.train(training)
    total = mx.distributed.all_sum(total, stream=mx.cpu)
    count = mx.distributed.all_sum(count, stream=mx.cpu)
    return (total / mx.maximum(count, 1)).item()


def train(model: nn.Module, optimizer, batches: Iterator, total_steps: int, *,
          loss: Callable = masked_loss, accumulation: int = 1, start_step: int = 0,
          seed: int = 0, on_step: Callable | None = None) -> int:
    """Run optimizer updates start_step+1 .. total_steps, each from `accumulation` micro-batches.

    `batches` yields (index, inputs, targets, mask); a `loss` that takes `rows` also gets the
    trained positions (trained_rows), so it may skip the others. Each update's gradient is the mean over every
    trained token of all its micro-batches on all ranks, so accumulation and data parallelism are
    exactly a bigger batch. After every update `on_step(step, loss, ntoks)` is called with that
    update's mean loss; if it returns True, training stops there. Returns the last step done.
    """
    state = [model.state, optimizer.state, mx.random.state]
    world = mx.distributed.init().size()
    rows_for = _rows_for(loss)

    def objective(model, inputs, targets, mask, norm, rows):
        value, ntoks = (loss(model, inputs, targets, mask) if rows is None
                        else loss(model, inputs, targets, mask, rows=rows))
        return value * ntoks / norm, value, ntoks

    value_and_grad = nn.value_and_grad(model, objective)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets, mask, norm, rows, prev_grad, do_update):
        (_, value, ntoks), grad = value_and_grad(model, inputs, targets, mask, norm, rows)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            # average_gradients divides by the world size, which `norm` already multiplied in.
            optimizer.update(model, average_gradients(grad))
            grad = None
        return value, ntoks, grad

    model.train()
    done = start_step
    for done in range(start_step + 1, total_steps + 1):
        micro = [next(batches)[1:] for _ in range(accumulation)]
        tokens = mx.distributed.all_sum(sum(m.sum() for _, _, m in micro), stream=mx.cpu)
        norm = mx.maximum(tokens, 1) / world
        # Dropout's randomness as a function of (seed, step): a resumed run draws the same masks.
        mx.random.seed(seed * 1_000_003 + done)
        grad, weighted = None, mx.array(0.0)
        for i, (inputs, targets, mask) in enumerate(micro):
            value, ntoks, grad = step(inputs, targets, mask, norm, rows_for(mask), grad,
                                      i == accumulation - 1)
            weighted = weighted + value * ntoks
            # Evaluate per micro-batch so at most one graph's activations are alive.
            mx.eval(state, weighted, grad)
        weighted = mx.distributed.all_sum(weighted, stream=mx.cpu)
        if on_step is not None and on_step(done, (weighted / mx.maximum(tokens, 1)).item(),
                                           int(tokens.item())):
            break
    return done
