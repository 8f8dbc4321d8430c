"""Preference tuning: the DPO and ORPO losses on chosen/rejected pairs (tokenized in train/data.py).

A batch of n pairs is 2n rows, the n chosen answers then the n rejected ones, each with a mask on
its answer tokens; the training loop and the CPU fast path see ordinary (inputs, targets, mask).
A pair's log-probability is the sum of its answer tokens' log-probabilities (`token_losses`,
which is the fused CPU loss on the CPU path).

DPO's reference model is the base itself: the same weights with every adapter bypassed
(`adapters_off`), under stop_gradient, so no second copy of the weights is ever loaded.

The formulas, for policy log-probabilities c, r (chosen, rejected) and reference ones c0, r0:
- DPO sigmoid: z = (c - c0) - (r - r0), loss = -log sigmoid(beta z)       (Rafailov et al. 2023)
- DPO hinge:   loss = max(0, 1 - beta z)                                   (SLiC)
- DPO ipo:     z from length-averaged log-probabilities, loss = (z - 1/(2 beta))^2  (Azar et al.)
- ORPO: with c, r length-averaged, loss = -c - beta log sigmoid(log odds(c) - log odds(r)),
  odds(p) = p / (1 - p)                                                    (Hong et al. 2024)
Rewards are beta (c - c0) and beta (r - r0) for DPO, beta c and beta r for ORPO, as TRL logs them.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from mlxtune.fastpath import token_losses
from mlxtune.train.data import Pair

MODES = ("sft", "dpo", "orpo")
STATS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")


def pair_count(mask: mx.array) -> mx.array:
    """How many pairs a batch of chosen-then-rejected rows holds (what the losses average over)."""
    return mx.array(mask.shape[0] // 2, dtype=mx.float32)


def _base_of(module: nn.Module) -> nn.Module | None:
    # mlx-lm's LoRALinear, DoRALinear and LoRASwitchLinear wrap `linear`, LoRAEmbedding and
    # DoRAEmbedding wrap `embedding`: the frozen layer as it was before the adapter.
    if "lora_a" not in module:
        return None
    return getattr(module, "linear", None) or getattr(module, "embedding", None)


@contextmanager
def adapters_off(model: nn.Module):
    """Inside, `model` computes as its base: every adapter layer is replaced by the layer it
    wraps (the same arrays, nothing copied); the adapters are put back on exit."""
    wrapped = [(path, m, _base_of(m)) for path, m in model.named_modules() if _base_of(m)]
    model.update_modules(tree_unflatten([(p, base) for p, _, base in wrapped]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten([(p, m) for p, m, _ in wrapped]))


def sequence_logps(model: nn.Module, inputs, targets, mask) -> tuple[mx.array, mx.array]:
    """Per row: the sum of the masked tokens' log-probabilities, and how many tokens that was."""
    logps = -token_losses(model, inputs, targets) * mask
    return logps.sum(axis=-1), mask.sum(axis=-1)


def reference_logps(model: nn.Module, inputs, targets, mask) -> mx.array:
    """sequence_logps of the base model (adapters bypassed), as a constant for the gradient."""
    with adapters_off(model):
        ref, _ = sequence_logps(model, inputs, targets, mask)
    return mx.stop_gradient(ref)


def _stats(chosen: mx.array, rejected: mx.array) -> dict:
    """Mean rewards, margin and accuracy over pairs; a tie (policy equal to reference) counts
    half, so accuracy starts at 0.5 rather than 0."""
    chosen, rejected = mx.stop_gradient(chosen), mx.stop_gradient(rejected)
    wins = (chosen > rejected).astype(mx.float32) + 0.5 * (chosen == rejected).astype(mx.float32)
    return {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
            "reward_margin": (chosen - rejected).mean(), "reward_accuracy": wins.mean()}


def dpo_losses(c, r, c0, r0, beta: float, loss_type: str) -> mx.array:
    """Per-pair DPO losses from policy (c, r) and reference (c0, r0) log-probabilities."""
    z = (c - c0) - (r - r0)
    if loss_type == "sigmoid":
        return nn.softplus(-beta * z)  # = -log sigmoid(beta z), without overflow
    if loss_type == "hinge":
        return nn.relu(1 - beta * z)
    if loss_type == "ipo":
        return (z - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss_type {loss_type!r}")


def dpo_loss(model: nn.Module, inputs, targets, mask, *, beta: float = 0.1,
             loss_type: str = "sigmoid"):
    """Mean DPO loss over the batch's pairs, the pair count, and the reward statistics."""
    n = inputs.shape[0] // 2
    logps, lengths = sequence_logps(model, inputs, targets, mask)
    ref = reference_logps(model, inputs, targets, mask)
    if loss_type == "ipo":
        # IPO compares average log-probabilities per token (as in TRL), not sums.
        lengths = mx.maximum(lengths, 1)
        logps, ref = logps / lengths, ref / lengths
    c, r, c0, r0 = logps[:n], logps[n:], ref[:n], ref[n:]
    losses = dpo_losses(c, r, c0, r0, beta, loss_type)
    return losses.mean(), pair_count(mask), _stats(beta * (c - c0), beta * (r - r0))


def orpo_losses(c, r, beta: float) -> mx.array:
    """Per-pair ORPO losses from length-averaged log-probabilities of the chosen and rejected
    answers (both negative): the chosen answer's NLL plus beta times the odds-ratio term."""
    # log(1 - p) for p = exp(c): log(-expm1(c)) stays exact for tiny c, where 1 - exp(c) rounds to
    # 0; the cap keeps a perfectly predicted answer (c = 0) finite.
    cap = -1e-6
    c_, r_ = mx.minimum(c, cap), mx.minimum(r, cap)
    log_odds = (c_ - r_) - (mx.log(-mx.expm1(c_)) - mx.log(-mx.expm1(r_)))
    return -c + beta * nn.softplus(-log_odds)


def orpo_loss(model: nn.Module, inputs, targets, mask, *, beta: float = 0.1):
    """Mean ORPO loss over the batch's pairs (no reference model), the pair count, and rewards."""
    n = inputs.shape[0] // 2
    logps, lengths = sequence_logps(model, inputs, targets, mask)
    avg = logps / mx.maximum(lengths, 1)
    c, r = avg[:n], avg[n:]
    return orpo_losses(c, r, beta).mean(), pair_count(mask), _stats(beta * c, beta * r)


def pair_logps(model: nn.Module, pairs: list[Pair], batch_size: int = 4):
    """(chosen, rejected) summed answer log-probabilities of every pair, in eval mode."""
    from mlxtune.train.data import collate

    training = model.training
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i: i + batch_size]
        logps, _ = sequence_logps(model, *collate(batch))
        mx.eval(logps)
        values = np.array(logps.astype(mx.float32)).tolist()
        chosen += values[: len(batch)]
        rejected += values[len(batch):]
    model.train(training)
    return chosen, rejected
