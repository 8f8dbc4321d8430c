// What the kernels' translation units share: the MLX namespace alias and the functions the
// nanobind module (cpu_kernels.cpp) binds from qmatmul.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace mlxtune {

// The base of the inference-only CPU ops: no GPU kernel, no gradient, one output shaped as
// the first input unless the op says otherwise.
class InferenceOnly : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string("[mlxtune ") + name() + "] CPU only.");
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>&, const std::vector<mx::array>&,
                             const std::vector<int>&, const std::vector<mx::array>&) override {
    throw std::runtime_error(std::string("[mlxtune ") + name() +
                             "] inference only, it has no gradient.");
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 protected:
  // Give each output its memory and hand every array to MLX's CPU encoder (then dispatch).
  mx::cpu::CommandEncoder& encoder_for(const std::vector<mx::array>& inputs,
                                       std::vector<mx::array>& outputs) {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& out : outputs) {
      out.set_data(mx::allocator::malloc(out.nbytes()));
      encoder.set_output_array(out);
    }
    for (auto& in : inputs) encoder.set_input_array(in);
    return encoder;
  }
};

// x @ dequantize(w, scales, biases).T for float32 x (..., K) and 4/8-bit affine w (N, K*bits/32);
// fast for a few rows of x (decoding), inference only.
mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits,
                           mx::StreamOrDevice s = {});

// Training's matmuls with a frozen weight: x @ dequantize(w).T (transpose) or x @ dequantize(w)
// for float32 x and 4/8-bit affine w (N, K*bits/32), group_size a multiple of 32, the weight
// de-quantized into register-tile blocks, never whole (qmatmul_train.cpp); no gradient of its own.
mx::array dequant_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                         const mx::array& biases, int group_size, int bits, bool transpose,
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

// softmax(q k^T * scale [causal, aligned to the last key]) v for training and prefill: q (B, H,
// L, D), k and v (B, KVH, S, D) with S >= L; returns [out (B, H, L, D), each row's log-sum-exp
// (B, H, L)]. attention_train_grad takes those and the output's cotangent and returns [dq, dk,
// dv] with dk and dv per query head (B, H, S, D): the caller sums the heads that share one.
std::vector<mx::array> attention_train(const mx::array& q, const mx::array& k,
                                       const mx::array& v, float scale, bool causal,
                                       mx::StreamOrDevice s = {});
std::vector<mx::array> attention_train_grad(const mx::array& q, const mx::array& k,
                                            const mx::array& v, const mx::array& o,
                                            const mx::array& lse, const mx::array& dout,
                                            float scale, bool causal, mx::StreamOrDevice s = {});

// ---- Raw routines on plain float rows, shared by the single ops above and the fused decode
// block (decode_block.cpp), which runs a whole transformer block as two ops. ----

enum ScaleType { SCALE_F32 = 0, SCALE_F16 = 1, SCALE_BF16 = 2 };

// A 4/8-bit affine weight (N x K) as quantized_matmul reads it.
struct QWeight {
  const uint8_t* w;
  const void* scales;
  const void* biases;
  int64_t N, K;
  int group_size, bits, scale_type, scale_bytes;
};

// `a`'s data as a plain row-major buffer: its own when it is one, else a copy into `copy`.
const void* row_major(const mx::array& a, std::vector<char>& copy);
// The weight, scales and biases as a QWeight (views copied into copies[0..2]).
QWeight qweight(const mx::array& w, const mx::array& scales, const mx::array& biases,
                int group_size, int bits, std::vector<char>* copies);
// y (M x N) = x (M x K) @ dequantize(w).T, rows of w split over the cores.
void qmatmul_raw(const float* x, int64_t M, const QWeight& w, float* y);
// y[i] = x @ dequantize(w[i]).T for `count` weights of one input width, their rows split over
// the cores together.
void qmatmul_multi(const float* x, int64_t M, const QWeight* w, float* const* y, int count);
// out = silu(gate) * up over n floats, split over the cores.
void swiglu_raw(const float* gate, const float* up, float* out, int64_t n);
// One row of rms_norm: out = x * rsqrt(mean(x^2) + eps) * w (x and w with element steps).
void rms_norm_row(const float* x, int64_t step, const float* w, int64_t wstep, int64_t d,
                  float eps, float* out);
// RoPE's cos/sin for `count` positions from `start` (half = dims / 2 of each).
void rope_angles(float start, int64_t count, int dims, float base, float scale, float* cos_t,
                 float* sin_t);
// One head vector rotated: x (D floats, element step `step`) into out (unit step).
void rope_apply(const float* x, int64_t step, float* out, int64_t D, int dims, bool traditional,
                const float* c, const float* s);

// A read-only view of a rank-4 float array (any strides) and an optional mask broadcasting to
// (B, H, L, S): bool (true keeps) or additive float32.
struct View4 {
  const float* data;
  int64_t shape[4], strides[4];
};
struct MaskView {
  const void* data = nullptr;
  bool is_bool = false;
  int64_t strides[4] = {0, 0, 0, 0};
};
View4 view4(const mx::array& a);
MaskView mask_view(const std::optional<mx::array>& mask);
// softmax(q k^T * scale + mask) v into out at out_strides (B, H, L, D order), heads split over
// the cores; query head h reads key/value head h / (H / KVH).
void attention_raw(const View4& q, const View4& k, const View4& v, const MaskView& mask,
                   float scale, bool causal, float* out, const int64_t out_strides[4]);

// ---- A transformer block as two ops for decoding (decode_block.cpp) ----

struct QuantSpec {
  int group_size = 32, bits = 4;
  bool operator==(const QuantSpec&) const = default;
};

// Low-rank adapter deltas added to some projections of a fused block: for projection i with
// bit i of `mask` set, a pair A ([slots,] in, rank) and B ([slots,] rank, out) comes among the
// inputs (in projection order), then each batch row's slot (int32) when `rows` (else slot 0),
// then each batch row's scale (float32) when `scales` (else 1): y += scale * (z A[slot]) B[slot].
struct LoraSpec {
  int mask = 0;
  bool rows = false, scales = false;
  bool operator==(const LoraSpec&) const = default;
};

struct QkvParams {
  float eps = 1e-5f;  // the input norm's
  int heads = 0, kv_heads = 0, head_dim = 0;
  int rope_dims = 0;
  bool traditional = false;
  float rope_base = 10000.0f, rope_scale = 1.0f;
  QuantSpec spec[3];  // q, k, v
  bool has_bias = false, has_qk_norm = false;
  float qk_eps = 1e-6f;
  LoraSpec lora;  // q, k, v
  bool operator==(const QkvParams&) const = default;
};

struct OutParams {
  float scale = 1.0f;  // attention's
  bool causal = false;
  float eps = 1e-5f;  // the post-attention norm's
  QuantSpec spec[4];  // o, gate, up, down
  bool has_mask = false;
  LoraSpec lora;  // o, gate, up, down
  int kv_length = -1;  // attend to the first kv_length positions of keys/values (-1: all)
  bool operator==(const OutParams&) const = default;
};

// rms_norm(x) through the q, k, v projections (weights: 3 x (packed, scales, biases)), plus
// extras (q/k/v biases, then q/k norm weights, as the params say), RoPE'd at `offset`:
// [q (B, H, L, Dh), k (B, KVH, L, Dh), v (B, KVH, L, Dh)].
std::vector<mx::array> decode_qkv(const mx::array& x, const mx::array& norm,
                                  const std::vector<mx::array>& weights, const mx::array& offset,
                                  const std::vector<mx::array>& extras, const QkvParams& p,
                                  const std::vector<mx::array>& lora = {},
                                  mx::StreamOrDevice s = {});
// h = x + o(attention(q, keys, values, mask)); h + down(silu(gate(n)) * up(n)), n = norm(h).
// weights: 4 x (packed, scales, biases) for o, gate, up, down.
mx::array decode_out(const mx::array& x, const mx::array& q, const mx::array& keys,
                     const mx::array& values, const std::vector<mx::array>& weights,
                     const mx::array& norm, const std::optional<mx::array>& mask,
                     const OutParams& p, const std::vector<mx::array>& lora = {},
                     mx::StreamOrDevice s = {});

// A block's settings for both ops, made once per block (decode_block.py's plan).
struct BlockParams {
  QkvParams qkv;
  OutParams out;
  bool operator==(const BlockParams&) const = default;
};

// `p` for one call: its attention causal or not, and each half's adapter spec (the rows' slots
// and scales come with a half's arrays only when that half has a pair: mask != 0).
BlockParams block_call(const BlockParams& p, bool causal, int qkv_mask, int out_mask, bool rows,
                       bool scales);

// A whole block's decode step in one call: decode_qkv, then k and v written at [prev, prev + L)
// of the KV cache's buffers (slice_update, as mlx-lm's KVCache writes them), then decode_out
// over positions [0, prev + L). Per block, a decode step's Python work had been two calls and
// mlx-lm's update_and_fetch: more than the block's arithmetic on a small model. weights: the
// seven projections' triples (q, k, v, o, gate, up, down); p.qkv.lora / p.out.lora say which
// arrays lora_qkv / lora_out hold. Returns [h, keys buffer, values buffer].
std::vector<mx::array> decode_block(const mx::array& x, const BlockParams& p,
                                    const mx::array& norm_in, const mx::array& norm_post,
                                    const std::vector<mx::array>& weights,
                                    const mx::array& offset, const std::vector<mx::array>& extras,
                                    const mx::array& keys, const mx::array& values, int prev,
                                    const std::optional<mx::array>& mask,
                                    const std::vector<mx::array>& lora_qkv,
                                    const std::vector<mx::array>& lora_out,
                                    mx::StreamOrDevice s = {});

// A decoder stack's weights and settings for decode_stack, gathered once (a step passes only
// what changes: x, the positions, the KV buffers, the adapter rows). Per layer: its settings,
// the input and post-attention norms' weights, the q/k/v triples, the o/gate/up/down triples
// and the extras (q/k/v biases, q/k norms' weights, as the settings say).
struct StackLayer {
  BlockParams params;
  std::vector<mx::array> norms, qkv, out, extras;
};
struct StackWeights {
  std::vector<StackLayer> layers;
};
// norms: two a layer (input, post-attention); weights: 21 a layer (q, k, v, o, gate, up, down
// triples). Evaluates any of them not yet evaluated (decode_stack reads them directly).
std::shared_ptr<const StackWeights> stack_weights(
    const std::vector<BlockParams>& params, const std::vector<mx::array>& norms,
    const std::vector<std::vector<mx::array>>& weights,
    const std::vector<std::vector<mx::array>>& extras);

// Every block of a decoder stack in one op (a decode step of a small model had been ~120 ops,
// each costing MLX its scheduling): for each layer decode_qkv, k and v written at
// [prev, prev + L) of its KV buffers (keys[i], values[i]: (B, kv_heads, room, head_dim), as
// mlx-lm's slice_update writes them, in place where nothing else holds a buffer, else into a
// copy), decode_out over [0, prev + L). One RoPE offset and mask for all layers (every layer's
// cache holds the same positions). Returns [h, keys buffers..., values buffers...].
struct StackAdapters {
  std::vector<std::vector<mx::array>> qkv, out;  // per layer (empty lists: none)
  std::vector<int> qkv_masks, out_masks;
  std::vector<int> rows, scales;  // per layer: whether its arrays end with rows / scales
};
std::vector<mx::array> decode_stack(const mx::array& x,
                                    const std::shared_ptr<const StackWeights>& stack,
                                    const mx::array& offset, const std::vector<mx::array>& keys,
                                    const std::vector<mx::array>& values, int prev,
                                    const std::optional<mx::array>& mask, bool causal,
                                    const StackAdapters& adapters, mx::StreamOrDevice s = {});

// The instruction set quantized_matmul uses ("avx512", "avx2" or "baseline"), and a switch to
// another the CPU has (tests check every path on one machine); returns the previous one.
std::string matmul_isa();
std::string set_matmul_isa(const std::string& isa);

}  // namespace mlxtune
