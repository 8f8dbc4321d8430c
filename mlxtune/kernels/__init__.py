"""mlxtune's compiled CPU kernels for MLX, when built (scripts/setup.sh builds them on Linux).

`dequantize(w, scales, biases, group_size, bits)` is the compiled 4/8-bit affine de-quantizer
(fp32 out, rows split over the cores; ~8x faster than MLX's ops for it), or None when the
extension is not built, was built against another MLX, or cannot exchange arrays with this
MLX: cpu_math then uses MLX's own ops (the same numbers, slower).
"""

from __future__ import annotations

import mlx.core as mx

try:
    from mlxtune.kernels import _cpu_kernels
except ImportError:
    _cpu_kernels = None

_REASON = "not built (run ./scripts/setup.sh, or python -m mlxtune.kernels.build)"


def _usable(module) -> bool:
    global _REASON
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


dequantize = _cpu_kernels.dequantize if _cpu_kernels is not None and _usable(_cpu_kernels) else None


def status() -> str:
    """One line for `mlxtune doctor`."""
    return "in use (compiled 4/8-bit de-quantizer)" if dequantize is not None else _REASON
