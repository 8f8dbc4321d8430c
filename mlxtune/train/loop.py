"""The training loop: a compiled step, the loss and the batches passed in, one hook per update."""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.utils import average_gradients
from mlx.utils import tree_map


def masked_loss(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array):
    """Mean cross-entropy over the tokens whose mask is 1, and how many there were."""
    logits = model(inputs).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    return ce.sum() / mx.maximum(ntoks, 1), ntoks


def evaluate(model: nn.Module, batches, loss: Callable = masked_loss) -> float:
    """Token-weighted mean loss over `batches` of (inputs, targets, mask), summed across ranks."""
    total, count = mx.array(0.0), mx.array(0.0)
    for inputs, targets, mask in batches:
        value, ntoks = loss(model, inputs, targets, mask)
        total, count = total + value * ntoks, count + ntoks
        mx.eval(total, count)
    total = mx.distributed.all_sum(total, stream=mx.cpu)
    count = mx.distributed.all_sum(count, stream=mx.cpu)
    return (total / mx.maximum(count, 1)).item()


def train(model: nn.Module, optimizer, batches: Iterator, total_steps: int, *,
          loss: Callable = masked_loss, accumulation: int = 1, start_step: int = 0,
          seed: int = 0, on_step: Callable | None = None) -> int:
    """Run optimizer updates start_step+1 .. total_steps, each from `accumulation` micro-batches.

    `batches` yields (index, inputs, targets, mask). After every update `on_step(step, loss, ntoks)`
    is called with that update's token-weighted loss; if it returns True, training stops there.
    Returns the last step done.
    """
    state = [model.state, optimizer.state, mx.random.state]
    value_and_grad = nn.value_and_grad(model, loss)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets, mask, prev_grad, do_update):
        (value, ntoks), grad = value_and_grad(model, inputs, targets, mask)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            # Mean over micro-batches, then over ranks (a no-op in one process).
            grad = average_gradients(tree_map(lambda g: g / accumulation, grad))
            optimizer.update(model, grad)
            grad = None
        return value, ntoks, grad

    model.train()
    done = start_step
    for done in range(start_step + 1, total_steps + 1):
        grad, weighted, tokens = None, mx.array(0.0), mx.array(0.0)
        # Dropout's randomness as a function of (seed, step): a resumed run draws the same masks.
        mx.random.seed(seed * 1_000_003 + done)
        for micro in range(accumulation):
            _, inputs, targets, mask = next(batches)
            value, ntoks, grad = step(inputs, targets, mask, grad, micro == accumulation - 1)
            weighted, tokens = weighted + value * ntoks, tokens + ntoks
            # Evaluate per micro-batch so at most one graph's activations are alive.
            mx.eval(state, weighted, tokens, grad)
        weighted = mx.distributed.all_sum(weighted, stream=mx.cpu)
        tokens = mx.distributed.all_sum(tokens, stream=mx.cpu)
        if on_step is not None and on_step(done, (weighted / mx.maximum(tokens, 1)).item(),
                                           int(tokens.item())):
            break
    return done
