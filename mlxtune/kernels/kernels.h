// What the kernels' translation units share: the MLX namespace alias and the functions the
// nanobind module (cpu_kernels.cpp) binds from qmatmul.cpp.
#pragma once

#include <optional>
#include <string>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace mlxtune {

// x @ dequantize(w, scales, biases).T for float32 x (..., K) and 4/8-bit affine w (N, K*bits/32);
// fast for a few rows of x (decoding), inference only.
mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits,
                           mx::StreamOrDevice s = {});

// MLX's fast.rms_norm and fast.rope formulas as one CPU op each (their CPU fallbacks are ~6
// and ~15 ops); float32, inference only. rope's offset: one int32, or one per batch row.
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps,
                   mx::StreamOrDevice s = {});
mx::array rope(const mx::array& x, int dims, bool traditional, float base, float scale,
               const mx::array& offset, mx::StreamOrDevice s = {});

// softmax(q k^T * scale + mask) v for a few queries (decoding): q (B, H, L, D), k and v
// (B, KVH, S, D) of any strides, a causal mask (aligned to the last key) and/or a bool or
// additive float32 mask broadcasting to (B, H, L, S); float32, inference only.
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                    bool causal, const std::optional<mx::array>& mask,
                    mx::StreamOrDevice s = {});

// The instruction set quantized_matmul uses ("avx512", "avx2" or "baseline"), and a switch to
// another the CPU has (tests check every path on one machine); returns the previous one.
std::string matmul_isa();
std::string set_matmul_isa(const std::string& isa);

}  // namespace mlxtune
