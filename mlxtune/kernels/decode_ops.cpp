// rms_norm and rope as single CPU ops, for generation.
//
// MLX's fast.rms_norm and fast.rope have no CPU kernels: on CPU they run their fallbacks, built
// from ~6 (rms_norm) and ~15 (rope: arange, exp, cos, sin, slices, concatenate) ops each, two
// norms and two ropes per layer. A decode step of SmolLM2-135M spends ~10 ms of ~25 in them,
// almost all of it per-op overhead on a few hundred numbers. These compute the same formulas as
// the fallbacks (mlx/fast.cpp) in one pass. fp32 only; inference only (no gradient).

#include <cmath>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "mlx/backend/cpu/encoder.h"

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
};

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
        const float* xr = x.data<float>() + row_offset(x, r);
        float* orow = o + r * d;
        float ss = 0.0f;
        for (int64_t i = 0; i < d; ++i) ss += xr[i * step] * xr[i * step];
        // As the fallback: x * rsqrt(mean(x^2) + eps), then times the weight.
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
        for (int64_t i = 0; i < d; ++i) orow[i] = (xr[i * step] * inv) * wd[i * wstep];
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
      std::vector<float> inv_freq(half), cos_t(T * half), sin_t(T * half);
      const float log_step = std::log(base) / static_cast<float>(half);
      for (int64_t i = 0; i < half; ++i) inv_freq[i] = std::exp(-static_cast<float>(i) * log_step);
      int64_t last_b = -1;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = r / per_batch, t = r % T;
        if (b != last_b && (b == 0 || offset.size() > 1)) {  // this batch row's angles
          const float start = static_cast<float>(offset.data<int32_t>()[offset.size() > 1 ? b : 0]);
          for (int64_t p = 0; p < T; ++p) {
            const float pos = (static_cast<float>(p) + start) * scale;
            for (int64_t i = 0; i < half; ++i) {
              const float theta = pos * inv_freq[i];
              cos_t[p * half + i] = std::cos(theta);
              sin_t[p * half + i] = std::sin(theta);
            }
          }
        }
        last_b = b;
        const float* xr = x.data<float>() + row_offset(x, r);
        float* orow = o + r * D;
        const float* c = cos_t.data() + t * half;
        const float* s = sin_t.data() + t * half;
        for (int64_t i = 0; i < half; ++i) {
          // Pairs (i, i + half), or (2i, 2i + 1) for the traditional layout.
          const int64_t i1 = traditional ? 2 * i : i, i2 = traditional ? 2 * i + 1 : i + half;
          const float x1 = xr[i1 * step], x2 = xr[i2 * step];
          orow[i1] = x1 * c[i] - x2 * s[i];
          orow[i2] = x1 * s[i] + x2 * c[i];
        }
        for (int64_t i = dims; i < D; ++i) orow[i] = xr[i * step];
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

}  // namespace

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
