// rms_norm, rope and a few-query attention as single CPU ops, for generation.
//
// MLX's fast.rms_norm, fast.rope and fast.scaled_dot_product_attention have no CPU kernels: on
// CPU they run their fallbacks, built from ~6, ~15 and ~12 ops each, per layer. A decode step is
// then mostly per-op overhead on a few hundred numbers (SmolLM2-135M: ~10 ms of ~25 in norms
// and ropes alone). These compute the fallbacks' formulas (mlx/fast.cpp) in one pass each.
// fp32 only; inference only (no gradient).

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"
#include "vec_math.h"

namespace mlxtune {
namespace {

// Element offset of row `row` (all axes but the last, row-major) of a strided array.
int64_t row_offset(const mx::array& x, int64_t row) {
  int64_t offset = 0;
  for (int axis = x.ndim() - 2; axis >= 0; --axis) {
    offset += (row % x.shape(axis)) * x.strides()[axis];
    row /= x.shape(axis);
  }
  return offset;
}

class RmsNorm : public InferenceOnly {
 public:
  RmsNorm(mx::Stream stream, float eps) : InferenceOnly(stream), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const auto& x = inputs[0];
    const auto& w = inputs[1];
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_output_array(out);
    encoder.dispatch([x, w, o = out.data<float>(), eps = eps_]() {
      const int64_t d = x.shape(-1), rows = x.size() / d, step = x.strides().back();
      const float* wd = w.data<float>();
      const int64_t wstep = w.strides()[0];
      for (int64_t r = 0; r < rows; ++r) {
        rms_norm_row(x.data<float>() + row_offset(x, r), step, wd, wstep, d, eps, o + r * d);
      }
    });
  }

  const char* name() const override {
    return "MlxtuneRmsNorm";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }

 private:
  float eps_;
};

class Rope : public InferenceOnly {
 public:
  Rope(mx::Stream stream, int dims, bool traditional, float base, float scale)
      : InferenceOnly(stream), dims_(dims), traditional_(traditional), base_(base),
        scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const auto& x = inputs[0];
    const auto& offset = inputs[1];
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(offset);
    encoder.set_output_array(out);
    encoder.dispatch([x, offset, o = out.data<float>(), dims = dims_, traditional = traditional_,
                      base = base_, scale = scale_]() {
      // x: (B, heads..., T, D), offset: one int32 or one per batch row.
      const int64_t D = x.shape(-1), T = x.shape(-2), B = x.shape(0);
      const int64_t rows = x.size() / D, per_batch = rows / B, half = dims / 2;
      const int64_t step = x.strides().back();
      std::vector<float> cos_t(T * half), sin_t(T * half);
      int64_t last_b = -1;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = r / per_batch, t = r % T;
        if (b != last_b && (b == 0 || offset.size() > 1)) {  // this batch row's angles
          const float start = static_cast<float>(offset.data<int32_t>()[offset.size() > 1 ? b : 0]);
          rope_angles(start, T, dims, base, scale, cos_t.data(), sin_t.data());
        }
        last_b = b;
        rope_apply(x.data<float>() + row_offset(x, r), step, o + r * D, D, dims, traditional,
                   cos_t.data() + t * half, sin_t.data() + t * half);
      }
    });
  }

  const char* name() const override {
    return "MlxtuneRope";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const Rope&>(other);
    return dims_ == o.dims_ && traditional_ == o.traditional_ && base_ == o.base_ &&
           scale_ == o.scale_;
  }

 private:
  int dims_;
  bool traditional_;
  float base_, scale_;
};

class Attention : public InferenceOnly {
 public:
  Attention(mx::Stream stream, float scale, bool causal)
      : InferenceOnly(stream), scale_(scale), causal_(causal) {}

  // softmax(q k^T * scale + mask) v for q (B, H, L, D) and k, v (B, KVH, S, D), any strides;
  // query head h reads key/value head h / (H / KVH). Rows are (b, h, l): few when decoding.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = encoder_for(inputs, outputs);
    auto& out = outputs[0];
    encoder.dispatch([inputs, o = out.data<float>(), scale = scale_, causal = causal_]() {
      const View4 q = view4(inputs[0]);
      const int64_t L = q.shape[2], D = q.shape[3], H = q.shape[1];
      const int64_t out_strides[4] = {H * L * D, L * D, D, 1};  // (B, H, L, D), row-major
      std::optional<mx::array> mask;
      if (inputs.size() > 3) mask = inputs[3];
      attention_raw(q, view4(inputs[1]), view4(inputs[2]), mask_view(mask), scale, causal, o,
                    out_strides);
    });
  }

  const char* name() const override {
    return "MlxtuneAttention";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const Attention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

 private:
  float scale_;
  bool causal_;
};


// a . b over n unit-stride floats, eight lanes at a time (GCC keeps a float sum in order, so it
// does not vectorize the plain loop itself).
__attribute__((target_clones("avx2", "default"))) float dot(const float* a, const float* b,
                                                            int64_t n) {
  v8f acc = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f x, y;
    std::memcpy(&x, a + i, sizeof(x));
    std::memcpy(&y, b + i, sizeof(y));
    acc += x * y;
  }
  float s = 0.0f;
  for (int k = 0; k < 8; ++k) s += acc[k];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// p = exp(p - max(p)) in place, eight lanes at a time; returns the sum.
__attribute__((target_clones("avx2", "default"))) float exp_shifted(float* p, int64_t n) {
  float top = -INFINITY;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, p[i]);
  v8f acc = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f x;
    std::memcpy(&x, p + i, sizeof(x));
    x = fast_exp(x - top);
    std::memcpy(p + i, &x, sizeof(x));
    acc += x;
  }
  float total = 0.0f;
  for (int k = 0; k < 8; ++k) total += acc[k];
  for (; i < n; ++i) total += (p[i] = fast_exp(p[i] - top));
  return total;
}

// p[s] = scale * q . k[s * kstride ..] for S keys of D floats: four keys at a time, so four
// independent sums hide the FMA latency (one key at a time was latency-bound: ~10 GFLOP/s).
__attribute__((target_clones("avx2", "default"))) void scores(
    const float* q, const float* k, int64_t kstride, int64_t S, int64_t D, float scale,
    float* p) {
  const int64_t Dv = D / 8 * 8;
  int64_t s = 0;
  for (; s + 4 <= S; s += 4) {
    v8f acc[4] = {};
    for (int64_t d = 0; d < Dv; d += 8) {
      v8f x;
      std::memcpy(&x, q + d, sizeof(x));
      for (int j = 0; j < 4; ++j) {
        v8f y;
        std::memcpy(&y, k + (s + j) * kstride + d, sizeof(y));
        acc[j] += x * y;
      }
    }
    for (int j = 0; j < 4; ++j) {
      float t = 0.0f;
      for (int l = 0; l < 8; ++l) t += acc[j][l];
      for (int64_t d = Dv; d < D; ++d) t += q[d] * k[(s + j) * kstride + d];
      p[s + j] = t * scale;
    }
  }
  for (; s < S; ++s) p[s] = dot(q, k + s * kstride, D) * scale;
}

// out (D floats) = sum over s of p[s] * norm * v[s * vstride ..]: up to 64 dims at a time in
// eight independent eight-lane sums.
__attribute__((target_clones("avx2", "default"))) void weighted_rows(
    const float* p, float norm, const float* v, int64_t vstride, int64_t S, int64_t D,
    float* out) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) {
    v8f acc[8] = {};
    for (int64_t s = 0; s < S; ++s) {
      const float w = p[s] * norm;
      for (int c = 0; c < 8; ++c) {
        v8f x;
        std::memcpy(&x, v + s * vstride + d0 + 8 * c, sizeof(x));
        acc[c] += w * x;
      }
    }
    std::memcpy(out + d0, acc, sizeof(acc));
  }
  for (int64_t d = d0; d < D; ++d) {
    float acc = 0.0f;
    for (int64_t s = 0; s < S; ++s) acc += (p[s] * norm) * v[s * vstride + d];
    out[d] = acc;
  }
}

// Strides of `a` broadcast to a rank-4 (B, H, L, S) shape: 0 on axes it has size 1 (or lacks).
void broadcast_strides(const mx::array& a, int64_t* out) {
  for (int i = 0; i < a.ndim(); ++i) {
    const int axis = 4 - a.ndim() + i;
    out[axis] = a.shape(i) == 1 ? 0 : a.strides()[i];
  }
}

}  // namespace

void rms_norm_row(const float* x, int64_t step, const float* w, int64_t wstep, int64_t d,
                  float eps, float* out) {
  float ss = 0.0f;
  for (int64_t i = 0; i < d; ++i) ss += x[i * step] * x[i * step];
  // As the fallback: x * rsqrt(mean(x^2) + eps), then times the weight.
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = (x[i * step] * inv) * w[i * wstep];
}

void rope_angles(float start, int64_t count, int dims, float base, float scale, float* cos_t,
                 float* sin_t) {
  const int64_t half = dims / 2;
  const float log_step = std::log(base) / static_cast<float>(half);
  std::vector<float> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) inv_freq[i] = std::exp(-static_cast<float>(i) * log_step);
  for (int64_t p = 0; p < count; ++p) {
    const float pos = (static_cast<float>(p) + start) * scale;
    for (int64_t i = 0; i < half; ++i) {
      const float theta = pos * inv_freq[i];
      cos_t[p * half + i] = std::cos(theta);
      sin_t[p * half + i] = std::sin(theta);
    }
  }
}

void rope_apply(const float* x, int64_t step, float* out, int64_t D, int dims, bool traditional,
                const float* c, const float* s) {
  const int64_t half = dims / 2;
  for (int64_t i = 0; i < half; ++i) {
    // Pairs (i, i + half), or (2i, 2i + 1) for the traditional layout.
    const int64_t i1 = traditional ? 2 * i : i, i2 = traditional ? 2 * i + 1 : i + half;
    const float x1 = x[i1 * step], x2 = x[i2 * step];
    out[i1] = x1 * c[i] - x2 * s[i];
    out[i2] = x1 * s[i] + x2 * c[i];
  }
  for (int64_t i = dims; i < D; ++i) out[i] = x[i * step];
}

View4 view4(const mx::array& a) {
  View4 v{a.data<float>(), {}, {}};
  for (int i = 0; i < 4; ++i) {
    v.shape[i] = a.shape(i);
    v.strides[i] = a.strides()[i];
  }
  return v;
}

MaskView mask_view(const std::optional<mx::array>& mask) {
  MaskView m;
  if (!mask) return m;
  m.data = mask->data<char>();
  m.is_bool = mask->dtype() == mx::bool_;
  broadcast_strides(*mask, m.strides);
  return m;
}

void attention_raw(const View4& q, const View4& k, const View4& v, const MaskView& mask,
                   float scale, bool causal, float* out, const int64_t out_strides[4]) {
  const int64_t B = q.shape[0], H = q.shape[1], L = q.shape[2], D = q.shape[3];
  const int64_t KVH = k.shape[1], S = k.shape[2], group = H / KVH;
  const int64_t *qs = q.strides, *ks = k.strides, *vs = v.strides, *ms = mask.strides;
  const bool unit = qs[3] == 1 && ks[3] == 1 && vs[3] == 1;  // the usual: rows of floats
  // One task per (batch row, head): its L queries against its key/value head.
  parallel_rows(B * H, 2 * L * S * D, [&](int64_t r0, int64_t r1) {
    std::vector<float> p(S);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, h = r % H;
      const float* kb = k.data + b * ks[0] + (h / group) * ks[1];
      const float* vb = v.data + b * vs[0] + (h / group) * vs[1];
      for (int64_t l = 0; l < L; ++l) {
        const float* qr = q.data + b * qs[0] + h * qs[1] + l * qs[2];
        const int64_t m0 = b * ms[0] + h * ms[1] + l * ms[2];
        if (unit) scores(qr, kb, ks[2], S, D, scale, p.data());
        for (int64_t s = 0; s < S; ++s) {
          float score = p[s];
          if (!unit) {
            float qk = 0.0f;
            for (int64_t d = 0; d < D; ++d) qk += qr[d * qs[3]] * kb[s * ks[2] + d * ks[3]];
            score = qk * scale;
          }
          if (causal && s > l + S - L) score = -INFINITY;  // aligned to the last key
          if (mask.data != nullptr) {
            const int64_t at = m0 + s * ms[3];
            if (mask.is_bool) {
              if (!static_cast<const bool*>(mask.data)[at]) score = -INFINITY;
            } else {
              score += static_cast<const float*>(mask.data)[at];
            }
          }
          p[s] = score;
        }
        const float total = exp_shifted(p.data(), S);
        float* orow = out + b * out_strides[0] + h * out_strides[1] + l * out_strides[2];
        if (unit) {
          weighted_rows(p.data(), 1.0f / total, vb, vs[2], S, D, orow);
        } else {
          for (int64_t d = 0; d < D; ++d) orow[d] = 0.0f;
          for (int64_t s = 0; s < S; ++s) {
            const float w = p[s] / total;
            for (int64_t d = 0; d < D; ++d) orow[d] += w * vb[s * vs[2] + d * vs[3]];
          }
        }
      }
    }
  }, 1 << 14);
}

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                    bool causal, const std::optional<mx::array>& mask, mx::StreamOrDevice s) {
  for (const auto* a : {&q, &k, &v}) {
    if (a->dtype() != mx::float32 || a->ndim() != 4) {
      throw std::invalid_argument("[mlxtune attention] expects float32 (B, heads, L, D) arrays.");
    }
  }
  if (k.shape() != v.shape() || q.shape(0) != k.shape(0) || q.shape(3) != k.shape(3) ||
      q.shape(1) % k.shape(1) != 0 || k.shape(2) < q.shape(2)) {
    throw std::invalid_argument("[mlxtune attention] q (B, H, L, D) and k, v (B, KVH, S, D) "
                                "with H a multiple of KVH and S >= L.");
  }
  std::vector<mx::array> inputs = {q, k, v};
  if (mask) {
    if (mask->ndim() > 4 || (mask->dtype() != mx::bool_ && mask->dtype() != mx::float32)) {
      throw std::invalid_argument("[mlxtune attention] mask: bool or float32, at most 4-D.");
    }
    mx::Shape full = {q.shape(0), q.shape(1), q.shape(2), k.shape(2)};
    for (int i = 0; i < mask->ndim(); ++i) {
      const int d = mask->shape(i), want = full[4 - mask->ndim() + i];
      if (d != 1 && d != want) {
        throw std::invalid_argument("[mlxtune attention] mask does not broadcast to the scores.");
      }
    }
    inputs.push_back(*mask);
  }
  mx::Shape shape = q.shape();
  return mx::array(shape, mx::float32,
                   std::make_shared<Attention>(mx::to_stream(s), scale, causal), inputs);
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps,
                   mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || weight.dtype() != mx::float32 || x.ndim() < 1 ||
      weight.ndim() != 1 || weight.shape(0) != x.shape(-1)) {
    throw std::invalid_argument("[mlxtune rms_norm] expects float32 x (..., D) and weight (D).");
  }
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(mx::to_stream(s), eps),
                   {x, weight});
}

mx::array rope(const mx::array& x, int dims, bool traditional, float base, float scale,
               const mx::array& offset, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || x.ndim() < 3 || dims % 2 != 0 || dims > x.shape(-1) ||
      dims <= 0) {
    throw std::invalid_argument(
        "[mlxtune rope] expects float32 x (B, ..., T, D) and even dims <= D.");
  }
  if (offset.ndim() > 1 || (offset.size() != 1 && offset.size() != x.shape(0))) {
    throw std::invalid_argument("[mlxtune rope] offset: one integer, or one per batch row.");
  }
  auto stream = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<Rope>(stream, dims, traditional, base, scale),
                   {x, mx::astype(offset, mx::int32, stream)});
}

}  // namespace mlxtune
