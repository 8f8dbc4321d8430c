// Training's matmuls with a frozen 4/8-bit weight: x @ W^T (forward) and dy @ W (the input's
// gradient), W de-quantized straight into the block a register tile reads.
//
// The BLAS route (de-quantize W to fp32, then sgemm) writes every weight in fp32 and reads it
// back: OpenBLAS then copies it into its own blocks (sgemm_oncopy) and first zeroes the output
// (sgemm_beta). perf on a SmolLM2 step (4 x 64 tokens, Zen 4): those copies and the de-quantizer
// were ~0.23 of 1.6 CPU-s, and the step's sgemm calls ran at ~155 GFLOP/s where the same shapes
// alone reach 180-198. Here each task takes a panel of output columns (two vectors wide),
// de-quantizes the weight values that panel needs into a K x panel block (L2-sized), and runs the
// register tiles of gemm_isa.inc (AVX-512, AVX2 or the x86-64 baseline, as set_matmul_isa says)
// over the rows of x: one pass over the packed weight, no fp32 copy of it, nothing to zero.
// Each output element is one sum over k in order, on one thread: the same on any thread count.

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "pool.h"
#include "vec_math.h"

namespace mlxtune {
namespace {

#define ISA_BODY "gemm_isa.inc"
#include "isa_namespaces.inc"
#undef ISA_BODY

// A block of W holds at most this many floats (256 KB: it is read once per tile of x's rows, so
// it stays in L2); longer sums go in parts, each added to the output (run).
constexpr int64_t BLOCK_FLOATS = 1 << 16;

struct Qmm {
  const float* x;
  const uint32_t* w;
  const void *scales, *biases;
  float* out;
  int64_t M, rows, cols;  // x's rows; W is rows x cols (out features x in features)
  int group_size, bits;
  bool transpose;  // out = x W^T (x: M x cols) when true, x W (x: M x rows) when false
};

// Eight lanes' `BITS`-bit fields of `words` (lane l: its word >> shift[l]) times scale plus bias.
template <int BITS>
inline v8f affine8(v8u words, v8u shifts, v8f scale, v8f bias) {
  const v8u q = (words >> shifts) & ((1u << BITS) - 1);
  return __builtin_convertvector((v8i)q, v8f) * scale + bias;
}

// The block of W that output columns [c0, c0 + n) multiply over sum terms [k0, k1): P[k - k0][j]
// (row step `width`) = W at (c0 + j, k) for x W^T, at (k, c0 + j) for x W; each value its
// `BITS`-bit field times its group's scale plus its bias (MLX's affine de-quantization). k0 is a
// multiple of BLOCK_FLOATS / width, so of any group size; c0 of width, so a panel of x W lies in
// one group and starts on a word. Eight columns at a time (8 rows of W for x W^T, side by side),
// single ones for a panel's last few.
template <int BITS, typename S>
__attribute__((target_clones("avx2", "default"))) void pack(const Qmm& q, int64_t c0, int64_t n,
                                                             int64_t k0, int64_t k1,
                                                             int64_t width, float* P) {
  constexpr int PER = 32 / BITS;
  const int64_t words = q.cols / PER, groups = q.cols / q.group_size;
  const S* scales = static_cast<const S*>(q.scales);
  const S* biases = static_cast<const S*>(q.biases);
  auto scale_at = [&](int64_t r, int64_t g) { return static_cast<float>(scales[r * groups + g]); };
  auto bias_at = [&](int64_t r, int64_t g) { return static_cast<float>(biases[r * groups + g]); };
  if (q.transpose) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {  // rows c0 + j .. + 8 of W: lane l is row c0 + j + l
      const uint32_t* row = q.w + (c0 + j) * words;
      for (int64_t g = k0 / q.group_size; g < k1 / q.group_size; ++g) {
        v8f sc, bi;
        for (int l = 0; l < 8; ++l) {
          sc[l] = scale_at(c0 + j + l, g);
          bi[l] = bias_at(c0 + j + l, g);
        }
        for (int64_t i = g * q.group_size / PER; i < (g + 1) * q.group_size / PER; ++i) {
          v8u w;
          for (int l = 0; l < 8; ++l) w[l] = row[l * words + i];
          for (int e = 0; e < PER; ++e) {
            const v8f f = affine8<BITS>(w, (v8u){} + BITS * e, sc, bi);
            std::memcpy(P + (i * PER + e - k0) * width + j, &f, sizeof(f));
          }
        }
      }
    }
    for (; j < n; ++j) {
      const uint32_t* row = q.w + (c0 + j) * words;
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t g = k / q.group_size;
        const uint32_t v = (row[k / PER] >> (BITS * (k % PER))) & ((1u << BITS) - 1);
        P[(k - k0) * width + j] =
            static_cast<float>(v) * scale_at(c0 + j, g) + bias_at(c0 + j, g);
      }
    }
  } else {
    const int64_t g = c0 / q.group_size;
    v8u shifts;
    for (int l = 0; l < 8; ++l) shifts[l] = BITS * (l % PER);
    for (int64_t k = k0; k < k1; ++k) {
      const v8f sc = (v8f){} + scale_at(k, g), bi = (v8f){} + bias_at(k, g);
      const uint32_t* row = q.w + k * words + c0 / PER;
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) {  // lane l: column c0 + j + l, in word (j + l) / PER
        v8u w;
        for (int l = 0; l < 8; ++l) w[l] = row[(j + l) / PER];
        const v8f f = affine8<BITS>(w, shifts, sc, bi);
        std::memcpy(P + (k - k0) * width + j, &f, sizeof(f));
      }
      for (; j < n; ++j) {
        const uint32_t v = (row[j / PER] >> (BITS * (j % PER))) & ((1u << BITS) - 1);
        P[(k - k0) * width + j] = static_cast<float>(v) * sc[0] + bi[0];
      }
    }
  }
}

// Sums longer than a block go in parts, one after another, each part's panels over the threads:
// the part of x they all read (rows x depth) stays in the caches.
template <typename S, typename Gemm>
void run(const Qmm& q, int64_t width, Gemm gemm) {
  const int64_t inner = q.transpose ? q.cols : q.rows, outer = q.transpose ? q.rows : q.cols;
  const int64_t panels = (outer + width - 1) / width, depth = BLOCK_FLOATS / width;
  for (int64_t k0 = 0; k0 < inner; k0 += depth) {
    const int64_t k1 = std::min(inner, k0 + depth);
    parallel_rows(panels, q.M * (k1 - k0) * width, [&](int64_t a, int64_t b) {
      thread_local std::vector<float> P;
      P.resize((k1 - k0) * width);
      for (int64_t p = a; p < b; ++p) {
        const int64_t c0 = p * width, n = std::min(width, outer - c0);
        if (q.bits == 4) {
          pack<4, S>(q, c0, n, k0, k1, width, P.data());
        } else {
          pack<8, S>(q, c0, n, k0, k1, width, P.data());
        }
        gemm(q.x + k0, inner, P.data(), width, q.out + c0, outer, q.M, k1 - k0, n, 1.0f, k0 > 0);
      }
    });
  }
}

template <typename S>
void run_isa(const Qmm& q) {
  const std::string isa = matmul_isa();
  if (isa == "avx512") return run<S>(q, 2 * avx512::W, avx512::gemm<false>);
  if (isa == "avx2") return run<S>(q, 2 * avx2::W, avx2::gemm<false>);
  run<S>(q, 2 * baseline::W, baseline::gemm<false>);
}

// Gradients come from cpu_math's custom function (this op with `transpose` flipped), so its own
// vjp is never asked for.
class DequantMatmul : public InferenceOnly {
 public:
  DequantMatmul(mx::Stream stream, int group_size, int bits, bool transpose)
      : InferenceOnly(stream), group_size_(group_size), bits_(bits), transpose_(transpose) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = encoder_for(inputs, outputs);
    const auto &x = inputs[0], &w = inputs[1], &scales = inputs[2];
    Qmm q{x.data<float>(), w.data<uint32_t>(), scales.data<void>(), inputs[3].data<void>(),
          outputs[0].data<float>(), x.size() / x.shape(-1), w.shape(0),
          w.shape(1) * 32 / bits_, group_size_, bits_, transpose_};
    const auto dtype = scales.dtype();
    encoder.dispatch([q, dtype]() {
      if (dtype == mx::float32) return run_isa<float>(q);
      if (dtype == mx::float16) return run_isa<mx::float16_t>(q);
      run_isa<mx::bfloat16_t>(q);
    });
  }

  const char* name() const override {
    return "MlxtuneDequantMatmul";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const DequantMatmul&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_ && transpose_ == o.transpose_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[0].shape();
    const auto& w = inputs[1];
    shape.back() = transpose_ ? w.shape(0) : w.shape(1) * 32 / bits_;
    return {shape};
  }

 private:
  int group_size_, bits_;
  bool transpose_;
};

}  // namespace

mx::array dequant_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                         const mx::array& biases, int group_size, int bits, bool transpose,
                         mx::StreamOrDevice s) {
  if (bits != 4 && bits != 8) {
    throw std::invalid_argument("[mlxtune dequant_matmul] bits must be 4 or 8.");
  }
  const int64_t cols = w.ndim() == 2 ? w.shape(1) * 32 / bits : 0;
  if (x.dtype() != mx::float32 || x.ndim() < 1 || w.dtype() != mx::uint32 || w.ndim() != 2 ||
      group_size <= 0 || group_size % 32 != 0 || cols % group_size != 0 ||
      scales.dtype() != biases.dtype() ||
      scales.shape() != mx::Shape{w.shape(0), static_cast<int>(cols / group_size)} ||
      biases.shape() != scales.shape() ||
      (scales.dtype() != mx::float32 && scales.dtype() != mx::float16 &&
       scales.dtype() != mx::bfloat16) ||
      x.shape(-1) != (transpose ? cols : w.shape(0))) {
    throw std::invalid_argument(
        "[mlxtune dequant_matmul] expects float32 x (..., K), uint32 w (N, K*bits/32), scales "
        "and biases (N, K/group_size) of one float dtype, group_size a multiple of 32; K = x's "
        "last axis for x @ W.T, N for x @ W.");
  }
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs;
  for (const auto* a : {&x, &w, &scales, &biases}) {
    inputs.push_back(mx::contiguous(*a, false, stream));
  }
  auto prim = std::make_shared<DequantMatmul>(stream, group_size, bits, transpose);
  auto shape = prim->output_shapes(inputs)[0];
  return mx::array(shape, mx::float32, prim, inputs);
}

}  // namespace mlxtune
