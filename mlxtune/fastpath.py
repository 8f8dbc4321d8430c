"""The one place that picks how a model computes on this backend.

On Metal and CUDA, MLX's quantized kernels are the fast path and nothing changes. On the CPU
backend, MLX's `quantized_matmul` is ~15x slower than de-quantizing the weight and calling the
BLAS matmul, and fp16/bf16 matmuls skip BLAS, so there quantized layers keep their packed 4/8-bit
weights and de-quantize to fp32 per layer inside a custom VJP that de-quantizes again in the
backward pass: the fp32 copy of a weight lives only while its layer computes, instead of every
layer's fp32 copy waiting for the backward pass (13.5 GB instead of ~4 for a 7B-shaped model).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

COMPUTE_DTYPE = mx.float32


def use_dequantized_matmul(backend: str) -> bool:
    """Whether quantized layers should de-quantize per layer (the CPU backend) or not."""
    return backend == "cpu"


def dequantize(w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
               bits: int, mode: str = "affine", dtype=COMPUTE_DTYPE) -> mx.array:
    """De-quantize packed weights (rows x packed columns) to `dtype`, computing in `dtype`."""
    # mx.dequantize computes in the scales' dtype: fp16 scales lose ~3e-3 even when asked for fp32.
    scales = scales.astype(dtype)
    biases = biases.astype(dtype) if biases is not None else None
    if mode != "affine" or bits not in (4, 8) or biases is None:
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)
    # For 4/8-bit affine these plain ops give the same numbers ~2x faster on CPU than
    # mx.dequantize (measured on the 49152 x 576 8-bit tied embedding: 142 vs 306 ms).
    # One broadcast expression, packed bytes -> (rows, groups, bytes per group, nibbles): no
    # stacked copy, so de-quantizing allocates little more than the fp32 result.
    u = w.view(mx.uint8).reshape(w.shape[0], -1, group_size * bits // 8, 1)
    if bits == 4:
        u = (u >> mx.array([0, 4], mx.uint8)) & mx.array(15, mx.uint8)
    q = u.astype(dtype) * scales[..., None, None] + biases[..., None, None]
    return q.reshape(w.shape[0], -1)


# At most this many weight elements are de-quantized at once (64 MB in fp32): bigger weights
# (the MLP's, the 32000-row lm_head at 0.5 GB) compute in row chunks, one fp32 chunk alive at a time.
CHUNK_ELEMENTS = 1 << 24


def row_chunks(rows: int, cols: int, tokens: int) -> list[tuple[int, int]]:
    """The row ranges a rows x cols weight is de-quantized in, for `tokens` input rows."""
    # Chunking costs a copy of the output (the chunks are concatenated): worth it only when the
    # fp32 weight it saves is bigger (7B's lm_head, not SmolLM2's 49152 x 576 tied head).
    if rows * cols - CHUNK_ELEMENTS <= tokens * rows:
        return [(0, rows)]
    step = -(-rows // -(-rows * cols // CHUNK_ELEMENTS))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


@lru_cache(maxsize=None)
def _matmul_fn(group_size: int, bits: int, mode: str, has_biases: bool):
    """`x @ dequantize(w).T` whose gradient w.r.t. x de-quantizes again instead of keeping w."""

    def weight(w, scales, biases, rows, dtype, after):
        # Rows a:b de-quantized only once `after` (the layer's input, or the previous chunk's
        # result) exists. Without it MLX's scheduler may de-quantize chunks and layers ahead of
        # their matmuls, and mx.compile merges the backward's de-quantization with the forward's
        # identical one, keeping every fp32 weight alive until the backward pass.
        a, b = rows
        parts = mx.depends([w[a:b], scales[a:b]] + ([biases[a:b]] if has_biases else []), after)
        return dequantize(parts[0], parts[1], parts[2] if has_biases else None, group_size, bits,
                          mode, dtype)

    def chunks(w, scales, x):
        return row_chunks(w.shape[0], scales.shape[-1] * group_size, x.size // x.shape[-1])

    @mx.custom_function
    def matmul(x, w, scales, biases):
        outs, after = [], x
        for rows in chunks(w, scales, x):
            after = x @ weight(w, scales, biases, rows, x.dtype, after).T
            outs.append(after)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        # Base weights are frozen: only the input gets a real gradient; the zeros stay lazy.
        dx = None
        for a, b in chunks(w, scales, cotangent):
            chunk = weight(w, scales, biases, (a, b), cotangent.dtype,
                           cotangent if dx is None else dx)
            part = cotangent[..., a:b] @ chunk
            dx = part if dx is None else dx + part
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


def dequantized_matmul(x: mx.array, layer: nn.Module) -> mx.array:
    """`x @ W.T` for a quantized layer's W, computed in x's dtype and de-quantized per call."""
    biases = layer.get("biases")
    fn = _matmul_fn(layer.group_size, layer.bits, layer.mode, biases is not None)
    # custom_function takes arrays only: stand in a scalar for a missing biases array.
    return fn(x, layer["weight"], layer["scales"], biases if biases is not None else mx.array(0))


class DequantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear (same packed weights, same isinstance for LoRA and fuse) that computes by
    de-quantizing to fp32 and calling the BLAS matmul."""

    def __call__(self, x):
        y = dequantized_matmul(x, self)
        return y + self["bias"] if "bias" in self else y

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> "DequantizedLinear":
        """The same layer, sharing its arrays, computing the de-quantized way."""
        return _rebase(cls, layer)


class DequantizedEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose lookups return fp32 and whose tied-head `as_linear` (for SmolLM2
    a 49152 x 576 matmul, the largest in the model) de-quantizes per call."""

    def __call__(self, x):
        biases = self.get("biases")
        rows = self["weight"][x]
        flat = dequantize(rows.reshape(-1, rows.shape[-1]),
                          self["scales"][x].reshape(rows.size // rows.shape[-1], -1),
                          biases[x].reshape(rows.size // rows.shape[-1], -1)
                          if biases is not None else None,
                          self.group_size, self.bits, self.mode)
        return flat.reshape(*x.shape, -1)

    def as_linear(self, x):
        """The tied output projection, de-quantized per call."""
        return dequantized_matmul(x, self)

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedEmbedding) -> "DequantizedEmbedding":
        """The same embedding, sharing its arrays, computing the de-quantized way."""
        return _rebase(cls, layer)


def _rebase(cls, layer: nn.Module) -> nn.Module:
    # Same arrays, same attributes (group_size, bits, mode, frozen keys): only the class changes,
    # so no weight is copied or re-quantized.
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    dict.update(new, layer)
    return new


_SWAPS = {nn.QuantizedLinear: DequantizedLinear, nn.QuantizedEmbedding: DequantizedEmbedding}


def dequantize_per_layer(model: nn.Module) -> int:
    """Swap every quantized linear/embedding (also inside LoRA layers) for its de-quantizing twin;
    returns how many were swapped."""
    swaps = []
    for path, module in model.named_modules():
        target = _SWAPS.get(type(module))  # exact type: leaves subclasses (and ours) alone
        if target is not None:
            swaps.append((path, target.from_quantized(module)))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def cast_floats(model: nn.Module, dtype=COMPUTE_DTYPE) -> None:
    """Cast float parameters (norms, float linears, LoRA) to `dtype`, leaving quantized layers'
    scales and biases as stored: they are up-cast per call and would otherwise double in size."""
    quantized = {path for path, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    updates = []
    for key, value in tree_flatten(model.parameters()):
        parent, _, name = key.rpartition(".")
        if parent in quantized and name in ("scales", "biases"):
            continue
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != dtype:
            updates.append((key, value.astype(dtype)))
    if updates:
        model.update(tree_unflatten(updates))


def prepare_for_training(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Set `model` up for this backend's fast path (CPU: de-quantize per layer, fp32); in place."""
    if backend is None:
        from mlxtune.platform import backend as current_backend

        backend = current_backend()
    if use_dequantized_matmul(backend):
        dequantize_per_layer(model)
        cast_floats(model)
    return model
