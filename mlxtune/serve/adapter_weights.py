"""An adapter's low-rank pairs read from its folder and checked against the served model, and the
resident adapters' pairs stacked by slot for the mixed batch step."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# One AdapterError for every adapter problem (models/adapters.py raises it too), so the app's
# 400 handler catches them all.
from mlxtune.errors import AdapterError


def read_pairs(adapter, slots: dict, dtype, max_rank: int, model_name: str) -> dict:
    """{layer path: (a, b scaled, DoRA factor or None)} of `adapter` as MLX arrays of `dtype`,
    every layer checked to be one of `slots` with matching shapes and a rank <= max_rank."""
    scale = float(adapter.info.get("lora_parameters", {}).get("scale", 20.0))
    try:
        weights = mx.load(str(adapter.path / "adapters.safetensors"))
    except Exception as e:  # mx.load raises plain RuntimeError on a bad file
        raise AdapterError(f"{adapter.path}: cannot read adapters.safetensors: {e}") from None
    pairs = {}
    for key in weights:
        if not key.endswith(".lora_a"):
            continue
        layer = key[: -len(".lora_a")]
        slot = slots.get(layer)
        if slot is None:
            raise AdapterError(f"{adapter.path}: {layer} is not a linear layer of "
                               f"{model_name}; was the adapter trained on another model?")
        a, b = weights[key], weights.get(f"{layer}.lora_b")
        out_dims, in_dims = _linear_dims(slot.linear)
        if b is None or a.shape != (in_dims, a.shape[1]) or b.shape != (a.shape[1], out_dims):
            raise AdapterError(f"{adapter.path}: {layer} has shapes {a.shape} / "
                               f"{None if b is None else b.shape}, but {model_name}'s layer is "
                               f"{out_dims}x{in_dims}; the adapter belongs to another model")
        if a.shape[1] > max_rank:
            raise AdapterError(f"adapter {adapter.name!r} has rank {a.shape[1]}, above "
                               f"--max-lora-rank {max_rank}")
        a = a.astype(dtype)
        b = (scale * b.astype(mx.float32)).astype(dtype)
        factor = None
        if f"{layer}.m" in weights:
            factor = _dora_factor(slot.linear, a, b, weights[f"{layer}.m"], dtype)
        pairs[layer] = (a, b, factor)
    if not pairs:
        raise AdapterError(f"{adapter.path}: adapters.safetensors has no LoRA weights")
    mx.eval([x for pair in pairs.values() for x in pair if x is not None])
    return pairs


def stack_pairs(by_slot: dict) -> dict:
    """{layer path: (a [n, in, R], b [n, R, out], factor [n, out] or None)} over the layers
    any resident adapter has, n the highest slot in use + 1: slot i holds by_slot[i]'s pair
    (zeros where it has none, and for the base's slot 0), rank zero-padded to the largest
    resident rank R."""
    n_slots = max(by_slot, default=0) + 1
    layers: dict[str, list] = {}
    for slot, adapter in by_slot.items():
        for path, pair in adapter.device.items():
            layers.setdefault(path, []).append((slot, pair))
    stacks = {}
    for path, held in layers.items():
        rank = max(a.shape[1] for _, (a, _, _) in held)
        a0, b0, _ = held[0][1]
        a_rows = [mx.zeros((a0.shape[0], rank), a0.dtype)] * n_slots
        b_rows = [mx.zeros((rank, b0.shape[1]), b0.dtype)] * n_slots
        f_rows = [mx.ones((b0.shape[1],), b0.dtype)] * n_slots
        for slot, (a, b, factor) in held:
            pad = rank - a.shape[1]
            a_rows[slot] = mx.pad(a, [(0, 0), (0, pad)]) if pad else a
            b_rows[slot] = mx.pad(b, [(0, pad), (0, 0)]) if pad else b
            if factor is not None:
                f_rows[slot] = factor
        dora = any(factor is not None for _, (_, _, factor) in held)
        stacks[path] = (mx.stack(a_rows), mx.stack(b_rows), mx.stack(f_rows) if dora else None)
    mx.eval([x for s in stacks.values() for x in s if x is not None])
    return stacks


def _linear_dims(linear: nn.Module) -> tuple[int, int]:
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return out_dims, in_dims


def _dequantized(linear: nn.Module) -> mx.array:
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales.astype(mx.float32),
                             linear.get("biases").astype(mx.float32)
                             if linear.get("biases") is not None else None,
                             group_size=linear.group_size, bits=linear.bits, mode=linear.mode)
    return linear.weight.astype(mx.float32)


def _dora_factor(linear, a, b, m, dtype) -> mx.array:
    # DoRA rescales each output row to magnitude m: m / ||W + B^T A^T||, fixed per adapter.
    adapted = _dequantized(linear) + (b.astype(mx.float32).T @ a.astype(mx.float32).T)
    return (m.astype(mx.float32) / mx.linalg.norm(adapted, axis=1)).astype(dtype)
