// CPU kernels for what MLX's own ops cannot do fast on CPU, as an MLX extension (primitives on
// MLX's CPU stream, nanobind bindings in MLX's type domain so mx.array passes both ways).
//
// MLX compiles an elementwise graph with a broadcast operand (a per-group scale, a row max) to a
// scalar strided loop (~2 ns an element on the CI machine's Zen 3) and runs it on one core:
// - dequantize: 4/8-bit affine weights to fp32, a word's eight nibbles unpacked with one vector
//   shift and scaled with one multiply-add (1536 x 576: 0.22 ms instead of 1.77);
// - softmax_parts: a row's max, exp(x - max) and the sum, for the fused cross-entropy (256 x
//   24576: 7 ms instead of 42); logsumexp: the same pass for generation's log-probabilities.
// - quantized_matmul (qmatmul.cpp): y = x @ dequantize(w).T for a few rows of x, reading the
//   packed weights (decoding: 576 x 576 4-bit, 1 row: 0.18 ms in MLX's op).
// - swiglu: silu(gate) * up with the vectorized exp, for generation's MLPs;
// - rms_norm, rope, attention (decode_ops.cpp): MLX's fast ops as one op each for decoding
//   (their CPU fallbacks are ~6, ~15 and ~12 ops, most of a decode step's per-op overhead).
// The big ones split rows over the cores (pool.h) and use AVX2 or AVX-512 where the CPU has it. See
// mlxtune/kernels/__init__.py for how mlxtune falls back to MLX's ops without them.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "kernels.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"
#include "vec_math.h"

namespace nb = nanobind;
using namespace nb::literals;
using mlxtune::parallel_rows;

// What Python holds of stack_weights' result (see the binding).
struct StackHandle {
  std::shared_ptr<const mlxtune::StackWeights> weights;
};

namespace {

using mlxtune::fast_exp;
using mlxtune::v8f;
using mlxtune::v8i;
using mlxtune::v8u;

// One row range of a (rows x cols) weight; `words` 32-bit words per row.
template <typename S>
__attribute__((target_clones("avx2", "default"))) void dequantize_rows(
    const uint32_t* w, const S* scales, const S* biases, float* out, int64_t row_begin,
    int64_t row_end, int64_t cols, int group_size, int bits) {
  const int64_t groups = cols / group_size;
  const int64_t words = cols * bits / 32;
  const int64_t words_per_group = group_size * bits / 32;
  const v8u shifts = {0, 4, 8, 12, 16, 20, 24, 28};
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint32_t* wr = w + r * words;
    float* outr = out + r * cols;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = static_cast<float>(scales[r * groups + g]);
      const float b = static_cast<float>(biases[r * groups + g]);
      const uint32_t* wg = wr + g * words_per_group;
      float* og = outr + g * group_size;
      if (bits == 4) {
        const v8f s8 = s - (v8f){};
        const v8f b8 = b - (v8f){};
        for (int64_t j = 0; j < words_per_group; ++j) {
          const v8u q = ((wg[j] - (v8u){}) >> shifts) & 15u;
          const v8f f = __builtin_convertvector((v8i)q, v8f) * s8 + b8;
          std::memcpy(og + 8 * j, &f, sizeof(f));
        }
      } else {  // 8 bits: bytes in order, little-endian words
        const uint8_t* bytes = reinterpret_cast<const uint8_t*>(wg);
        for (int i = 0; i < group_size; ++i) {
          og[i] = static_cast<float>(bytes[i]) * s + b;
        }
      }
    }
  }
}

template <typename S>
void dequantize_parallel(const uint32_t* w, const S* scales, const S* biases, float* out,
                         int64_t rows, int64_t cols, int group_size, int bits) {
  parallel_rows(rows, cols, [&](int64_t a, int64_t b) {
    dequantize_rows<S>(w, scales, biases, out, a, b, cols, group_size, bits);
  });
}

class AffineDequantize : public mx::Primitive {
 public:
  AffineDequantize(mx::Stream stream, int group_size, int bits)
      : mx::Primitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& w = inputs[0];
    auto& scales = inputs[1];
    auto& biases = inputs[2];
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(w);
    encoder.set_input_array(scales);
    encoder.set_input_array(biases);
    encoder.set_output_array(out);
    const int64_t rows = out.shape(0), cols = out.shape(1);
    const int gs = group_size_, bits = bits_;
    auto dtype = scales.dtype();
    encoder.dispatch([w = w.data<uint32_t>(), s = scales.data<void>(), b = biases.data<void>(),
                      o = out.data<float>(), rows, cols, gs, bits, dtype]() {
      if (dtype == mx::float32) {
        dequantize_parallel(w, static_cast<const float*>(s), static_cast<const float*>(b), o,
                            rows, cols, gs, bits);
      } else if (dtype == mx::float16) {
        dequantize_parallel(w, static_cast<const mx::float16_t*>(s),
                            static_cast<const mx::float16_t*>(b), o, rows, cols, gs, bits);
      } else {
        dequantize_parallel(w, static_cast<const mx::bfloat16_t*>(s),
                            static_cast<const mx::bfloat16_t*>(b), o, rows, cols, gs, bits);
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[mlxtune AffineDequantize] CPU only.");
  }

  const char* name() const override {
    return "MlxtuneAffineDequantize";
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[0].shape(1) * 32 / bits_}};
  }

 private:
  int group_size_;
  int bits_;
};

mx::array dequantize(const mx::array& w, const mx::array& scales, const mx::array& biases,
                     int group_size, int bits, mx::StreamOrDevice s) {
  if (bits != 4 && bits != 8) {
    throw std::invalid_argument("[mlxtune dequantize] bits must be 4 or 8.");
  }
  if (w.ndim() != 2 || w.dtype() != mx::uint32 || scales.ndim() != 2 ||
      scales.shape() != biases.shape() || scales.dtype() != biases.dtype() ||
      scales.shape(0) != w.shape(0) || group_size % 8 != 0 ||
      scales.shape(1) * group_size != w.shape(1) * 32 / bits) {
    throw std::invalid_argument("[mlxtune dequantize] expects uint32 (rows, words) weights and "
                                "(rows, groups) scales and biases of one float type.");
  }
  if (scales.dtype() != mx::float32 && scales.dtype() != mx::float16 &&
      scales.dtype() != mx::bfloat16) {
    throw std::invalid_argument("[mlxtune dequantize] scales must be float32/16 or bfloat16.");
  }
  auto stream = mx::to_stream(s);
  // The kernel reads plain row-major buffers.
  auto inputs = std::vector<mx::array>{mx::contiguous(w, false, stream),
                                       mx::contiguous(scales, false, stream),
                                       mx::contiguous(biases, false, stream)};
  mx::Shape shape = {w.shape(0), w.shape(1) * 32 / bits};
  return mx::array(shape, mx::float32,
                   std::make_shared<AffineDequantize>(stream, group_size, bits), inputs);
}


// ---- softmax_parts and logsumexp: a row's max and the sum of exp(x - max) ----

// A row's max and the sum of exp(x - max), eight lanes at a time; each exp is stored in `e`
// unless it is null.
__attribute__((always_inline)) inline void exp_sum_row(const float* x, float* e, int64_t cols,
                                                       float& max, float& sum) {
  const int64_t vec = cols / 8 * 8;
  v8f m8 = -INFINITY - (v8f){};
  for (int64_t i = 0; i < vec; i += 8) {
    v8f v;
    std::memcpy(&v, x + i, sizeof(v));
    m8 = v > m8 ? v : m8;
  }
  float m = -INFINITY;
  for (int k = 0; k < 8; ++k) m = std::max(m, m8[k]);
  for (int64_t i = vec; i < cols; ++i) m = std::max(m, x[i]);
  v8f s8 = {};
  for (int64_t i = 0; i < vec; i += 8) {
    v8f v;
    std::memcpy(&v, x + i, sizeof(v));
    const v8f y = fast_exp(v - m);
    if (e != nullptr) std::memcpy(e + i, &y, sizeof(y));
    s8 += y;
  }
  float total = 0.0f;
  for (int k = 0; k < 8; ++k) total += s8[k];
  for (int64_t i = vec; i < cols; ++i) {
    const float y = fast_exp(x[i] - m);
    if (e != nullptr) e[i] = y;
    total += y;
  }
  max = m;
  sum = total;
}

__attribute__((target_clones("avx2", "default"))) void softmax_rows(
    const float* x, float* e, float* maxes, float* sums, int64_t row_begin, int64_t row_end,
    int64_t cols) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    exp_sum_row(x + r * cols, e + r * cols, cols, maxes[r], sums[r]);
  }
}

// log(sum(exp(x))) of each row, as MLX's logsumexp (a row whose max is infinite gives the max).
__attribute__((target_clones("avx2", "default"))) void logsumexp_rows(
    const float* x, float* out, int64_t row_begin, int64_t row_end, int64_t cols) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    float m, sum;
    exp_sum_row(x + r * cols, nullptr, cols, m, sum);
    out[r] = std::isinf(m) ? m : m + std::log(sum);
  }
}

class SoftmaxParts : public mx::Primitive {
 public:
  explicit SoftmaxParts(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& x = inputs[0];
    for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    for (auto& o : outputs) encoder.set_output_array(o);
    const int64_t cols = x.shape(-1), rows = x.size() / cols;
    encoder.dispatch([x = x.data<float>(), e = outputs[0].data<float>(),
                      m = outputs[1].data<float>(), s = outputs[2].data<float>(), rows, cols]() {
      parallel_rows(rows, cols, [&](int64_t a, int64_t b) {
        softmax_rows(x, e, m, s, a, b, cols);
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[mlxtune SoftmaxParts] CPU only.");
  }

  const char* name() const override {
    return "MlxtuneSoftmaxParts";
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto row = inputs[0].shape();
    row.back() = 1;
    return {inputs[0].shape(), row, row};
  }
};

// (exp(x - max), max, sum of the former) over the last axis of a float32 array.
std::vector<mx::array> softmax_parts(const mx::array& x, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || x.ndim() < 1) {
    throw std::invalid_argument("[mlxtune softmax_parts] expects a float32 array.");
  }
  auto stream = mx::to_stream(s);
  auto row = x.shape();
  row.back() = 1;
  return mx::array::make_arrays({x.shape(), row, row}, {mx::float32, mx::float32, mx::float32},
                                std::make_shared<SoftmaxParts>(stream),
                                {mx::contiguous(x, false, stream)});
}

// mlx-lm normalizes every decoding step's logits with mx.logsumexp, whose CPU loop is scalar
// on x86 (SmolLM2's 49152-token vocabulary: 0.69 ms of a ~7 ms step; this: ~0.05 ms).
class LogSumExp : public mlxtune::InferenceOnly {
 public:
  explicit LogSumExp(mx::Stream stream) : mlxtune::InferenceOnly(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = encoder_for(inputs, outputs);
    const int64_t cols = inputs[0].shape(-1), rows = inputs[0].size() / cols;
    encoder.dispatch([x = inputs[0].data<float>(), o = outputs[0].data<float>(), rows, cols]() {
      parallel_rows(rows, cols, [&](int64_t a, int64_t b) { logsumexp_rows(x, o, a, b, cols); });
    });
  }

  const char* name() const override {
    return "MlxtuneLogSumExp";
  }

  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto row = inputs[0].shape();
    row.back() = 1;
    return {row};
  }
};

// log(sum(exp(x))) over the last axis of a float32 array, the axis kept (size 1).
mx::array logsumexp(const mx::array& x, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || x.ndim() < 1 || x.shape(-1) == 0) {
    throw std::invalid_argument("[mlxtune logsumexp] expects a float32 array with a last axis.");
  }
  auto stream = mx::to_stream(s);
  auto row = x.shape();
  row.back() = 1;
  return mx::array(row, mx::float32, std::make_shared<LogSumExp>(stream),
                   {mx::contiguous(x, false, stream)});
}

// ---- swiglu: silu(gate) * up for generation's MLPs ----

// MLX compiles silu(gate) * up to a scalar loop with a libm exp per element: batch 8 of SmolLM2
// spent ~5% of a decode step there. Here eight lanes at a time with fast_exp (rel. error < 1e-6).
__attribute__((target_clones("avx2", "default"))) void swiglu_range(
    const float* gate, const float* up, float* out, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    v8f g, u;
    std::memcpy(&g, gate + i, sizeof(g));
    std::memcpy(&u, up + i, sizeof(u));
    const v8f y = g * u / (1.0f + fast_exp(-g));
    std::memcpy(out + i, &y, sizeof(y));
  }
  for (; i < end; ++i) out[i] = gate[i] * up[i] / (1.0f + fast_exp(-gate[i]));
}

class Swiglu : public mlxtune::InferenceOnly {
 public:
  explicit Swiglu(mx::Stream stream) : mlxtune::InferenceOnly(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = encoder_for(inputs, outputs);
    auto& out = outputs[0];
    encoder.dispatch([inputs, o = out.data<float>()]() {
      std::vector<float> copies[2];
      const float* data[2];
      for (int k = 0; k < 2; ++k) {
        const auto& a = inputs[k];
        if (a.flags().row_contiguous) {
          data[k] = a.data<float>();
          continue;
        }
        copies[k].resize(a.size());  // a strided view: gather it (rare)
        for (int64_t i = 0; i < static_cast<int64_t>(a.size()); ++i) {
          int64_t rest = i, offset = 0;
          for (int axis = a.ndim() - 1; axis >= 0; --axis) {
            offset += (rest % a.shape(axis)) * a.strides()[axis];
            rest /= a.shape(axis);
          }
          copies[k][i] = a.data<float>()[offset];
        }
        data[k] = copies[k].data();
      }
      mlxtune::swiglu_raw(data[0], data[1], o, inputs[0].size());
    });
  }

  const char* name() const override {
    return "MlxtuneSwiglu";
  }

  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  if (gate.dtype() != mx::float32 || up.dtype() != mx::float32 || gate.shape() != up.shape()) {
    throw std::invalid_argument("[mlxtune swiglu] expects float32 gate and up of one shape.");
  }
  return mx::array(gate.shape(), mx::float32, std::make_shared<Swiglu>(mx::to_stream(s)),
                   {gate, up});
}

}  // namespace

// (group size, bits) pairs from Python's flat list.
void set_specs(mlxtune::QuantSpec* spec, size_t count, const std::vector<int>& flat) {
  if (flat.size() != 2 * count) {
    throw std::invalid_argument("[mlxtune] specs: a group size and bits per weight.");
  }
  for (size_t i = 0; i < count; ++i) {
    spec[i] = {flat[2 * i], flat[2 * i + 1]};
    if ((spec[i].bits != 4 && spec[i].bits != 8) ||
        (spec[i].group_size != 32 && spec[i].group_size != 64 && spec[i].group_size != 128)) {
      throw std::invalid_argument("[mlxtune] specs: bits 4 or 8, group size 32, 64 or 128.");
    }
  }
}

void mlxtune::swiglu_raw(const float* gate, const float* up, float* out, int64_t n) {
  parallel_rows(n, 8, [&](int64_t a, int64_t b) { swiglu_range(gate, up, out, a, b); });
}

NB_MODULE(_cpu_kernels, m) {
  m.doc() = "mlxtune's CPU kernels for MLX (built by mlxtune.kernels.build).";
  m.def("dequantize", &dequantize, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "De-quantize affine 4/8-bit packed weights (rows x words, uint32) to float32.");
  m.def("softmax_parts", &softmax_parts, "x"_a, nb::kw_only(), "stream"_a = nb::none(),
        "exp(x - max), max and the sum of the former over the last axis (float32).");
  m.def("logsumexp", &logsumexp, "x"_a, nb::kw_only(), "stream"_a = nb::none(),
        "log(sum(exp(x))) over the last axis of float32 x, kept as size 1 (inference only).");
  m.def("quantized_matmul", &mlxtune::quantized_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a,
        "group_size"_a, "bits"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x @ dequantize(w).T for float32 x and 4/8-bit affine weights, fast for a few rows of x "
        "(decoding); inference only (no gradient).");
  m.def("rms_norm", &mlxtune::rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(),
        "stream"_a = nb::none(), "x * rsqrt(mean(x^2) + eps) * weight over the last axis "
        "(float32, one op; inference only).");
  m.def("rope", &mlxtune::rope, "x"_a, "dims"_a, "traditional"_a, "base"_a, "scale"_a,
        "offset"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Rotary position embedding as mx.fast.rope computes it (float32, one op; inference "
        "only); offset: an int32 array, one value or one per batch row.");
  m.def("swiglu", &swiglu, "gate"_a, "up"_a, nb::kw_only(), "stream"_a = nb::none(),
        "silu(gate) * up with a vectorized exp (float32, one op; inference only).");
  m.def("attention", &mlxtune::attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a,
        "mask"_a = nb::none(), nb::kw_only(), "stream"_a = nb::none(),
        "softmax(q k^T * scale + mask) v for a few queries (float32, one op; inference only).");
  m.def("attention_train", &mlxtune::attention_train, "q"_a, "k"_a, "v"_a, "scale"_a,
        "causal"_a, nb::kw_only(), "stream"_a = nb::none(),
        "[softmax(q k^T * scale [causal]) v, each row's log-sum-exp] for training (float32).");
  m.def("attention_train_grad", &mlxtune::attention_train_grad, "q"_a, "k"_a, "v"_a, "o"_a,
        "lse"_a, "dout"_a, "scale"_a, "causal"_a, nb::kw_only(), "stream"_a = nb::none(),
        "[dq, dk, dv] of attention_train, dk and dv per query head (B, H, S, D).");
  m.def("dequant_matmul", &mlxtune::dequant_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a,
        "group_size"_a, "bits"_a, "transpose"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x @ dequantize(w).T (transpose) or x @ dequantize(w) for training, the weight never "
        "de-quantized whole (float32 x; 4/8-bit affine w; no gradient of its own).");
  m.def(
      "decode_qkv",
      [](const mx::array& x, const mx::array& norm, const std::vector<mx::array>& weights,
         const mx::array& offset, const std::vector<mx::array>& extras, float eps, int heads,
         int kv_heads, int head_dim, int rope_dims, bool traditional, float rope_base,
         float rope_scale, const std::vector<int>& specs, bool has_bias, bool has_qk_norm,
         float qk_eps, const std::vector<mx::array>& lora, int lora_mask, bool lora_rows,
         bool lora_scales, mx::StreamOrDevice s) {
        mlxtune::QkvParams p{eps, heads, kv_heads, head_dim, rope_dims, traditional, rope_base,
                             rope_scale, {}, has_bias, has_qk_norm, qk_eps,
                             {lora_mask, lora_rows, lora_scales}};
        set_specs(p.spec, 3, specs);
        return mlxtune::decode_qkv(x, norm, weights, offset, extras, p, lora, s);
      },
      "x"_a, "norm"_a, "weights"_a, "offset"_a, "extras"_a, nb::kw_only(), "eps"_a, "heads"_a,
      "kv_heads"_a, "head_dim"_a, "rope_dims"_a, "traditional"_a, "rope_base"_a, "rope_scale"_a,
      "specs"_a, "has_bias"_a, "has_qk_norm"_a, "qk_eps"_a,
      "lora"_a = std::vector<mx::array>{}, "lora_mask"_a = 0, "lora_rows"_a = false,
      "lora_scales"_a = false, "stream"_a = nb::none(),
      "A block's first half for decoding: rms_norm, the q/k/v projections (weights: three "
      "(packed, scales, biases) triples; specs: group size and bits of each), extras (q/k/v "
      "biases, q/k norm weights), RoPE at offset: [q, k, v] as (B, heads, L, head_dim).");
  m.def(
      "decode_out",
      [](const mx::array& x, const mx::array& q, const mx::array& keys, const mx::array& values,
         const std::vector<mx::array>& weights, const mx::array& norm,
         const std::optional<mx::array>& mask, float scale, bool causal, float eps,
         const std::vector<int>& specs, const std::vector<mx::array>& lora, int lora_mask,
         bool lora_rows, bool lora_scales, mx::StreamOrDevice s) {
        mlxtune::OutParams p{scale, causal, eps, {}, false, {lora_mask, lora_rows, lora_scales}};
        set_specs(p.spec, 4, specs);
        return mlxtune::decode_out(x, q, keys, values, weights, norm, mask, p, lora, s);
      },
      "x"_a, "q"_a, "keys"_a, "values"_a, "weights"_a, "norm"_a, "mask"_a = nb::none(),
      nb::kw_only(), "scale"_a, "causal"_a, "eps"_a, "specs"_a,
      "lora"_a = std::vector<mx::array>{}, "lora_mask"_a = 0, "lora_rows"_a = false,
      "lora_scales"_a = false, "stream"_a = nb::none(),
      "A block's second half for decoding: x + o(attention), then + down(silu(gate) * up) of "
      "its norm (weights: o, gate, up, down as (packed, scales, biases) triples). Both ops take "
      "low-rank adapter deltas: lora = an (A, B) pair per projection set in lora_mask, then "
      "each batch row's slot (lora_rows) and scale (lora_scales).");
  nb::class_<mlxtune::BlockParams>(m, "BlockParams",
                                   "A decoder block's settings for decode_block (block_params).");
  m.def(
      "block_params",
      [](float eps, int heads, int kv_heads, int head_dim, int rope_dims, bool traditional,
         float rope_base, float rope_scale, const std::vector<int>& specs, bool has_bias,
         bool has_qk_norm, float qk_eps, float scale, float out_eps,
         const std::vector<int>& out_specs) {
        mlxtune::BlockParams p;
        p.qkv = {eps, heads, kv_heads, head_dim, rope_dims, traditional, rope_base, rope_scale,
                 {}, has_bias, has_qk_norm, qk_eps, {}};
        set_specs(p.qkv.spec, 3, specs);
        p.out = {scale, false, out_eps, {}, false, {}};
        set_specs(p.out.spec, 4, out_specs);
        return p;
      },
      nb::kw_only(), "eps"_a, "heads"_a, "kv_heads"_a, "head_dim"_a, "rope_dims"_a,
      "traditional"_a, "rope_base"_a, "rope_scale"_a, "specs"_a, "has_bias"_a, "has_qk_norm"_a,
      "qk_eps"_a, "scale"_a, "out_eps"_a, "out_specs"_a,
      "A block's settings for decode_block: decode_qkv's keywords, then decode_out's scale, "
      "eps (as out_eps) and specs (as out_specs).");
  m.def(
      "decode_block",
      [](const mlxtune::BlockParams& params, const mx::array& x, const mx::array& norm_in,
         const mx::array& norm_post, const std::vector<mx::array>& weights,
         const mx::array& offset, const std::vector<mx::array>& extras, const mx::array& keys,
         const mx::array& values, int prev, const std::optional<mx::array>& mask, bool causal,
         const std::vector<mx::array>& lora_qkv, const std::vector<mx::array>& lora_out,
         int qkv_mask, int out_mask, bool lora_rows, bool lora_scales, mx::StreamOrDevice s) {
        return mlxtune::decode_block(
            x, mlxtune::block_call(params, causal, qkv_mask, out_mask, lora_rows, lora_scales),
            norm_in, norm_post, weights, offset, extras, keys, values, prev, mask, lora_qkv,
            lora_out, s);
      },
      "params"_a, "x"_a, "norm_in"_a, "norm_post"_a, "weights"_a, "offset"_a, "extras"_a,
      "keys"_a, "values"_a, "prev"_a, "mask"_a.none(), "causal"_a,
      "lora_qkv"_a = std::vector<mx::array>{}, "lora_out"_a = std::vector<mx::array>{},
      "qkv_mask"_a = 0, "out_mask"_a = 0, "lora_rows"_a = false, "lora_scales"_a = false,
      nb::kw_only(), "stream"_a = nb::none(),
      "A decoder block's decode step in one call: decode_qkv, k and v written into the KV "
      "cache's buffers (keys, values: (B, kv_heads, room, head_dim)) at [prev, prev + L), "
      "decode_out over [0, prev + L). weights: q, k, v, o, gate, up, down triples; adapter "
      "arrays per half as the two ops take them, with each half's projection mask. Returns "
      "[h, keys buffer, values buffer].");
  // Python holds the stack's weights through a handle: a shared_ptr that nanobind made would
  // release its Python object (taking the GIL) wherever its last C++ holder went, and the last
  // holder can be a decode_stack task on MLX's CPU stream while the GIL's holder waits for that
  // stream (mx.synchronize): a deadlock.
  nb::class_<StackHandle>(m, "StackWeights",
                          "A decoder stack's weights and settings for decode_stack "
                          "(stack_weights).");
  m.def(
      "stack_weights",
      [](const std::vector<mlxtune::BlockParams>& params, const std::vector<mx::array>& norms,
         const std::vector<std::vector<mx::array>>& weights,
         const std::vector<std::vector<mx::array>>& extras) {
        return StackHandle{mlxtune::stack_weights(params, norms, weights, extras)};
      },
      "params"_a, "norms"_a, "weights"_a, "extras"_a,
      "A decoder stack's weights for decode_stack, gathered once: per layer its block_params, "
      "two norm weights (input, post-attention), 21 weight arrays (q, k, v, o, gate, up, down "
      "triples) and extras (q/k/v biases, q/k norms' weights).");
  m.def(
      "decode_stack",
      [](const mx::array& x, const StackHandle& stack, const mx::array& offset,
         const std::vector<mx::array>& keys, const std::vector<mx::array>& values, int prev,
         const std::optional<mx::array>& mask, bool causal,
         const std::vector<std::vector<mx::array>>& lora_qkv,
         const std::vector<std::vector<mx::array>>& lora_out, const std::vector<int>& qkv_masks,
         const std::vector<int>& out_masks, const std::vector<int>& lora_rows,
         const std::vector<int>& lora_scales, mx::StreamOrDevice s) {
        return mlxtune::decode_stack(
            x, stack.weights, offset, keys, values, prev, mask, causal,
            {lora_qkv, lora_out, qkv_masks, out_masks, lora_rows, lora_scales}, s);
      },
      "x"_a, "stack"_a, "offset"_a, "keys"_a, "values"_a, "prev"_a, "mask"_a.none(), "causal"_a,
      "lora_qkv"_a, "lora_out"_a, "qkv_masks"_a, "out_masks"_a, "lora_rows"_a, "lora_scales"_a,
      nb::kw_only(), "stream"_a = nb::none(),
      "Every block of a decoder stack as one op: per layer decode_qkv, k and v written into its "
      "KV buffers at [prev, prev + L) (in place where nothing else holds them), decode_out; "
      "one RoPE offset and mask for all, per layer adapter inputs. Returns [h, keys buffers..., "
      "values buffers...].");
  m.def("matmul_isa", &mlxtune::matmul_isa, "The instruction set quantized_matmul uses.");
  m.def("set_matmul_isa", &mlxtune::set_matmul_isa, "isa"_a,
        "Use another instruction set the CPU has (avx512, avx2, baseline); returns the previous.");
  m.attr("MLX_VERSION") = mx::version();
}
