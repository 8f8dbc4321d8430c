"""The frozen-prefix cache: compute the untrained lower layers once per example, not once per epoch.

With LoRA on the top layers only, nothing below the first adapted layer changes during training
and those layers have no dropout, so the hidden state an example reaches there is the same every
epoch. PEFT recomputes it each time. Here the first epoch computes it (outside the gradient, the
same work as before) and keeps it; later epochs, and every validation pass after the first, start
at the first adapted layer. On a model with adapters on its top 4 of 30 layers that skips over
half of a step's arithmetic.

Only positions up to each example's last trained token are kept: with a causal model later
positions never reach a trained position's loss. Rows are keyed by those tokens, so the cache
needs no example ids and stays right whatever the batch order or padding. Memory: that many
tokens x hidden size x 4 bytes; past `max_bytes` new rows are computed each time instead.
"""

from __future__ import annotations

import hashlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask

from mlxtune.errors import ConfigError
from mlxtune.fastpath import STANDARD


class _Skipped(nn.Module):
    """Stands in for a cached layer: its input, the cached hidden state, passes through."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        # llama's forward reads this to choose the layer's mask.
        self.use_sliding = getattr(layer, "use_sliding", False)

    def __call__(self, x, mask=None, cache=None):
        return x


def kept_length(trained: np.ndarray) -> int:
    """How many leading positions of a row are kept: up to its last trained one (0 if none)."""
    hits = np.flatnonzero(trained)
    return int(hits[-1]) + 1 if hits.size else 0


def kept_tokens(examples) -> int:
    """Tokens the cache holds for these examples (train/data.Tokenized) once all are seen."""
    return sum(kept_length(e.loss_mask) for e in examples)


def first_trained_layer(model: nn.Module) -> int:
    """Index of the lowest transformer block with a trainable parameter (0: nothing to skip)."""
    inner = model.model
    if tree_flatten(inner.embed_tokens.trainable_parameters()):
        return 0
    for i, layer in enumerate(inner.layers):
        if tree_flatten(layer.trainable_parameters()):
            return i
    return len(inner.layers)


class FrozenPrefix:
    """Computes and keeps the hidden states entering `model`'s first trained layer.

    Installing it replaces the layers below with pass-throughs (parameter paths of the trained
    layers are unchanged, so adapters and checkpoints are too); `remove` puts them back.
    Batches mapped through `hidden` carry those hidden states in place of token ids, which
    fastpath.token_losses accepts.
    """

    def __init__(self, model: nn.Module, max_bytes: int):
        if type(model).__module__ not in STANDARD:
            raise ConfigError([f"cache_frozen_layers: supported for llama, qwen2 and qwen3 "
                               f"models, not {type(model).__module__.rsplit('.', 1)[-1]}"])
        self.model, self.max_bytes = model, max_bytes
        self.start = first_trained_layer(model)
        inner = model.model
        if any(isinstance(m, nn.Dropout) and m._p_1 < 1 for layer in inner.layers[:self.start]
               for _, m in layer.named_modules()):
            raise ConfigError(["cache_frozen_layers: the untrained layers use dropout, so "
                               "their outputs differ every epoch; turn the cache off"])
        self.lower = list(inner.layers[:self.start])
        self.embed = inner.embed_tokens
        self.sliding_window = getattr(inner, "sliding_window", None)
        self.dim = model.args.hidden_size
        self.entries: dict[bytes, mx.array] = {}
        self.bytes = self.hits = self.misses = 0
        for i in range(self.start):
            inner.layers[i] = _Skipped(inner.layers[i])

    def remove(self) -> None:
        """Put the real lower layers back (the model computes from its embedding again)."""
        for i, layer in enumerate(self.lower):
            self.model.model.layers[i] = layer

    def _lower_forward(self, inputs: mx.array) -> mx.array:
        h = self.embed(inputs)
        full = create_attention_mask(h, None)
        window = (create_attention_mask(h, None, window_size=self.sliding_window)
                  if self.sliding_window else full)
        for layer in self.lower:
            h = layer(h, window if getattr(layer, "use_sliding", False) else full)
        return h

    def hidden(self, inputs: mx.array, mask: mx.array) -> mx.array:
        """The (batch, length, hidden) states entering the first trained layer for this batch;
        rows past their last trained position are zeros (nothing trained can see them)."""
        if self.start == 0:
            return inputs
        tokens, trained = np.asarray(inputs), np.asarray(mask) != 0
        lengths = [kept_length(t) for t in trained]
        keys = [hashlib.blake2b(row[:n].tobytes(), digest_size=16).digest()
                for row, n in zip(tokens, lengths)]
        todo = [i for i, k in enumerate(keys) if k not in self.entries and lengths[i]]
        fresh = {}
        if todo:
            computed = self._lower_forward(inputs[mx.array(todo)])
            for j, i in enumerate(todo):
                # A copy, not a view: a view would keep the whole padded batch alive.
                fresh[keys[i]] = mx.contiguous(computed[j, :lengths[i]])
            mx.eval(list(fresh.values()))
            for key, h in fresh.items():
                if self.bytes + h.nbytes <= self.max_bytes:
                    self.entries[key], self.bytes = h, self.bytes + h.nbytes
        self.misses += len(todo)
        self.hits += sum(1 for n in lengths if n) - len(todo)
        width = inputs.shape[1]
        kept = [self.entries.get(key, fresh.get(key)) if n else None
                for key, n in zip(keys, lengths)]
        dtype = next((h.dtype for h in kept if h is not None), mx.float32)
        return mx.stack([mx.zeros((width, self.dim), dtype) if h is None
                         else mx.pad(h, [(0, width - h.shape[0]), (0, 0)]) for h in kept])

    def batches(self, batches):
        """`batches` of (index, inputs, targets, mask) with inputs replaced by hidden states."""
        for index, inputs, targets, mask in batches:
            yield index, self.hidden(inputs, mask), targets, mask

    def eval_batches(self, batches):
        """Validation `batches` of (inputs, targets, mask), the same way."""
        for inputs, targets, mask in batches:
            yield self.hidden(inputs, mask), targets, mask
