"""mlxtune's compiled CPU kernels for MLX, when built (scripts/setup.sh builds them on Linux).

- `dequantize(w, scales, biases, group_size, bits)`: 4/8-bit affine weights to fp32, rows split
  over the cores (~8x faster than MLX's ops for it, the same numbers);
- `softmax_parts(x)`: (exp(x - max), max, sum) over the last axis in one vectorized pass on all
  cores, for the fused cross-entropy (~6x faster than MLX's ops); `logsumexp(x)`: the same pass
  for generation's log-probabilities (MLX's CPU logsumexp is a scalar loop: ~14x slower);
- `quantized_matmul(x, w, scales, biases, group_size, bits)`: x @ dequantize(w).T for fp32 x,
  reading the packed 4/8-bit weights, for decoding (a few rows of x; ~6x faster than MLX's
  `quantized_matmul` for one row). Inference only: it has no gradient.
- `attention_train(q, k, v, scale, causal)`: attention for training and prefill, returning each
  row's log-sum-exp too, and `attention_train_grad`: its gradient from those (probabilities
  recomputed, not kept), block-tiled products on all cores (2-7x faster than MLX's ops);
- `dequant_matmul(x, w, scales, biases, group_size, bits, transpose)`: training's x @ W.T and
  dy @ W with a frozen 4/8-bit W de-quantized straight into register-tile blocks (no fp32 copy
  of W, no BLAS copies of it);
- `rms_norm`, `rope`, `attention`, `swiglu`: MLX's fast ops as one op each for generation;
- `decode_qkv`, `decode_out`: a whole decoder block as two ops when decoding (decode_block.py):
  a token of SmolLM2-135M is ~200 MLX ops instead of ~750; `decode_block` (with
  `block_params`): both, and the KV cache's write between them, in one call; `decode_stack`
  (with `stack_weights`): every block of the model as one op.

Each is None when MLXTUNE_CPU_KERNELS=0, when the extension is not built, was built against
another MLX, or cannot exchange arrays with this MLX: cpu_math then uses MLX's own ops (slower).
"""

from __future__ import annotations

import mlx.core as mx

from mlxtune.blas import switched_off

OFF_VAR = "MLXTUNE_CPU_KERNELS"  # "0" turns them off (MLX's ops are used)

try:
    from mlxtune.kernels import _cpu_kernels
except ImportError:
    _cpu_kernels = None

_REASON = "not built (run ./scripts/setup.sh, or python -m mlxtune.kernels.build)"


# What this package's Python side calls: a module built from older sources lacks some of them.
KERNELS = ("dequantize", "softmax_parts", "logsumexp", "quantized_matmul", "rms_norm", "rope",
           "attention", "attention_train", "attention_train_grad", "dequant_matmul", "swiglu",
           "decode_qkv", "decode_out", "block_params", "decode_block", "stack_weights",
           "decode_stack")


def _usable(module) -> bool:
    global _REASON
    missing = [name for name in KERNELS if not hasattr(module, name)]
    if missing:
        _REASON = f"built from older sources (no {', '.join(missing)}): rebuild"
        return False
    if module.MLX_VERSION != mx.__version__:
        _REASON = f"built for MLX {module.MLX_VERSION}, this is {mx.__version__}: rebuild"
        return False
    try:  # a nanobind other than MLX's own cannot take an mx.array: TypeError
        out = module.dequantize(mx.zeros((1, 4), mx.uint32), mx.ones((1, 1)), mx.zeros((1, 1)),
                                32, 4, stream=mx.cpu)
        mx.eval(out)
    except TypeError:
        _REASON = "built with a nanobind MLX cannot exchange arrays with: rebuild"
        return False
    return True


if switched_off(OFF_VAR):
    _cpu_kernels, _REASON = None, f"turned off ({OFF_VAR}=0)"
_OK = _cpu_kernels is not None and _usable(_cpu_kernels)
dequantize = _cpu_kernels.dequantize if _OK else None
softmax_parts = _cpu_kernels.softmax_parts if _OK else None
logsumexp = _cpu_kernels.logsumexp if _OK else None
quantized_matmul = _cpu_kernels.quantized_matmul if _OK else None
rms_norm = _cpu_kernels.rms_norm if _OK else None
rope = _cpu_kernels.rope if _OK else None
attention = _cpu_kernels.attention if _OK else None
attention_train = _cpu_kernels.attention_train if _OK else None
attention_train_grad = _cpu_kernels.attention_train_grad if _OK else None
dequant_matmul = _cpu_kernels.dequant_matmul if _OK else None
swiglu = _cpu_kernels.swiglu if _OK else None
decode_qkv = _cpu_kernels.decode_qkv if _OK else None
decode_out = _cpu_kernels.decode_out if _OK else None
block_params = _cpu_kernels.block_params if _OK else None
decode_block = _cpu_kernels.decode_block if _OK else None
stack_weights = _cpu_kernels.stack_weights if _OK else None
decode_stack = _cpu_kernels.decode_stack if _OK else None


def status() -> str:
    """One line for `mlxtune doctor`."""
    if dequantize is None:
        return _REASON
    return ("in use (compiled 4/8-bit de-quantizer and quantized matmul "
            f"[{_cpu_kernels.matmul_isa()}], training matmul and attention, softmax parts, "
            "logsumexp, rms_norm, rope, attention, swiglu, fused decode blocks)")
