// quantized_matmul: y = x @ dequantize(w).T for a few rows of x (decoding: 1-8 tokens), reading
// MLX's packed 4/8-bit affine weights directly.
//
// Decoding touches every weight once per token, so its speed is how fast the packed weights
// stream from memory: SmolLM2-135M is 92 MB in 4 bits against 540 MB de-quantized to fp32, and
// MLX's own CPU quantized_matmul runs at ~2 GFLOP/s (a scalar loop). Here each group of weights
// is de-quantized in registers (q * scale + bias, as MLX's dequantize computes it) and used for
// every row of x before the next group is read, the weight rows split over the cores. The inner
// loops (qmatmul_isa.inc) are compiled for AVX-512, for AVX2 + FMA (Zen 3) and for the x86-64
// baseline, and the best one the CPU has is picked at run time. Inference only: no gradient.

#include "kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "pool.h"

namespace mlxtune {
namespace {

struct QArgs {
  const float* x;  // M x K; the kernel reads it laid out by lay_out_x
  const uint8_t* w;
  const void* scales;
  const void* biases;
  float* y;  // M x N
  int64_t M, K, N;
  int group_size, bits, scale_type, scale_bytes;
  const float* xsum = nullptr;  // one row of x: its sum per group (the one-row path)
};

// IEEE half to float without F16C (the baseline build).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename V, typename T>
__attribute__((always_inline)) inline V bits_as(const T& parts) {
  static_assert(sizeof(V) == sizeof(T));
  V v;
  std::memcpy(&v, &parts, sizeof(v));
  return v;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
namespace avx512 {
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
__attribute__((always_inline)) inline vi widen(const uint8_t* p) {
  return bits_as<vi>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
__attribute__((always_inline)) inline float hsum(vf v) {
  return _mm512_reduce_add_ps(bits_as<__m512>(v));
}
void halves_to_floats(const uint16_t* h, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(h + i))));
  }
  for (; i < n; ++i) out[i] = _cvtsh_ss(h[i]);
}
#define QMM_MAX_ROWS 8
#include "qmatmul_isa.inc"
#undef QMM_MAX_ROWS
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
__attribute__((always_inline)) inline vi widen(const uint8_t* p) {
  return bits_as<vi>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
__attribute__((always_inline)) inline float hsum(vf v) {
  const __m256 w = bits_as<__m256>(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps(w, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
void halves_to_floats(const uint16_t* h, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(h + i))));
  }
  for (; i < n; ++i) out[i] = _cvtsh_ss(h[i]);
}
#define QMM_MAX_ROWS 4
#include "qmatmul_isa.inc"
#undef QMM_MAX_ROWS
}  // namespace avx2
#pragma GCC pop_options

namespace baseline {
typedef float vf __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(16)));
__attribute__((always_inline)) inline vi widen(const uint8_t* p) {
  int32_t four;
  std::memcpy(&four, p, sizeof(four));
  const __m128i zero = _mm_setzero_si128();
  return bits_as<vi>(_mm_unpacklo_epi16(_mm_unpacklo_epi8(_mm_cvtsi32_si128(four), zero), zero));
}
__attribute__((always_inline)) inline float hsum(vf v) {
  return (v[0] + v[2]) + (v[1] + v[3]);
}
void halves_to_floats(const uint16_t* h, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(h[i]);
}
#define QMM_MAX_ROWS 2
#include "qmatmul_isa.inc"
#undef QMM_MAX_ROWS
}  // namespace baseline

struct Isa {
  void (*rows)(const QArgs&, int64_t, int64_t);
  int max_rows;
};

bool cpu_has(const std::string& isa) {
  __builtin_cpu_init();
  if (isa == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  if (isa == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }
  return isa == "baseline";
}

// The best set this CPU has, or the one MLXTUNE_CPU_ISA names when the CPU has it (to run the
// AVX2 or baseline paths on a bigger CPU, as OPENBLAS_CORETYPE and ATEN_CPU_CAPABILITY do).
std::string& current_isa() {
  static std::string isa = [] {
    const char* wanted = std::getenv("MLXTUNE_CPU_ISA");
    if (wanted != nullptr && cpu_has(wanted)) return std::string(wanted);
    return std::string(cpu_has("avx512") ? "avx512" : cpu_has("avx2") ? "avx2" : "baseline");
  }();
  return isa;
}

Isa isa_now() {
  const std::string& isa = current_isa();
  if (isa == "avx512") return {avx512::matmul_rows, avx512::MAX_ROWS};
  if (isa == "avx2") return {avx2::matmul_rows, avx2::MAX_ROWS};
  return {baseline::matmul_rows, baseline::MAX_ROWS};
}

// x (M x K) laid out as the inner loop reads it: each pass of up to `max_rows` rows as 32-blocks
// with the pass's rows side by side ([K/32][rows][32], starting at row m0 * K); for 4 bits each
// block's even elements first, then its odd ones (the low and high nibbles of 16 bytes).
void lay_out_x(const float* x, float* out, int64_t M, int64_t K, int bits, int max_rows) {
  for (int64_t m0 = 0; m0 < M; m0 += max_rows) {
    const int64_t rows = std::min<int64_t>(max_rows, M - m0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < K; k += 32) {
        const float* src = x + (m0 + r) * K + k;
        float* dst = out + m0 * K + (k / 32 * rows + r) * 32;
        for (int j = 0; j < 16; ++j) {
          dst[j] = bits == 4 ? src[2 * j] : src[j];
          dst[16 + j] = bits == 4 ? src[2 * j + 1] : src[16 + j];
        }
      }
    }
  }
}

class QuantizedMatmul : public InferenceOnly {
 public:
  QuantizedMatmul(mx::Stream stream, int group_size, int bits)
      : InferenceOnly(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = encoder_for(inputs, outputs);
    auto& out = outputs[0];
    encoder.dispatch([inputs, y = out.data<float>(), group_size = group_size_, bits = bits_]() {
      // Views (a sliced weight, a transposed x) are copied here: an mx::contiguous per input
      // would add four ops to every matmul, a fifth of a decode step's per-op overhead.
      std::vector<char> copies[4];
      const auto* x = static_cast<const float*>(row_major(inputs[0], copies[0]));
      const QWeight w = qweight(inputs[1], inputs[2], inputs[3], group_size, bits, copies + 1);
      qmatmul_raw(x, inputs[0].size() / inputs[0].shape(-1), w, y);
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>&, const std::vector<mx::array>&,
                             const std::vector<int>&, const std::vector<mx::array>&) override {
    throw std::runtime_error(
        "[mlxtune quantized_matmul] inference only, it has no gradient: training de-quantizes "
        "(mlxtune.cpu_math.dequantized_matmul) or uses mx.quantized_matmul.");
  }

  const char* name() const override {
    return "MlxtuneQuantizedMatmul";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QuantizedMatmul&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }

 private:
  int group_size_;
  int bits_;
};

}  // namespace

// `a`'s data as a plain row-major buffer: its own when it is one, else a copy into `copy`.
const void* row_major(const mx::array& a, std::vector<char>& copy) {
  if (a.flags().row_contiguous) return a.data<char>();
  const int64_t item = a.itemsize(), n = a.size();
  copy.resize(n * item);
  for (int64_t i = 0; i < n; ++i) {
    int64_t rest = i, offset = 0;
    for (int axis = a.ndim() - 1; axis >= 0; --axis) {
      offset += (rest % a.shape(axis)) * a.strides()[axis];
      rest /= a.shape(axis);
    }
    std::memcpy(copy.data() + i * item, a.data<char>() + offset * item, item);
  }
  return copy.data();
}

QWeight qweight(const mx::array& w, const mx::array& scales, const mx::array& biases,
                int group_size, int bits, std::vector<char>* copies) {
  return QWeight{static_cast<const uint8_t*>(row_major(w, copies[0])),
                 row_major(scales, copies[1]),
                 row_major(biases, copies[2]),
                 w.shape(0),
                 static_cast<int64_t>(w.shape(1)) * 32 / bits,
                 group_size,
                 bits,
                 scales.dtype() == mx::float32   ? SCALE_F32
                 : scales.dtype() == mx::float16 ? SCALE_F16
                                                 : SCALE_BF16,
                 static_cast<int>(scales.itemsize())};
}

void qmatmul_raw(const float* x, int64_t M, const QWeight& w, float* y) {
  qmatmul_multi(x, M, &w, &y, 1);
}

void qmatmul_multi(const float* x, int64_t M, const QWeight* w, float* const* y, int count) {
  const Isa isa = isa_now();
  const int64_t K = w[0].K;
  // x laid out once per bit width in use (the layout differs for 4 and 8 bits).
  std::vector<float> laid[2], sums[3];  // sums: by group size 32, 64, 128
  std::vector<QArgs> args;
  int64_t rows = 0;
  for (int i = 0; i < count; ++i) {
    std::vector<float>& buf = laid[w[i].bits == 4 ? 0 : 1];
    if (buf.empty()) {
      buf.resize(M * K);
      lay_out_x(x, buf.data(), M, K, w[i].bits, isa.max_rows);
    }
    args.push_back({buf.data(), w[i].w, w[i].scales, w[i].biases, y[i], M, K, w[i].N,
                    w[i].group_size, w[i].bits, w[i].scale_type, w[i].scale_bytes});
    if (M == 1 && w[i].bits == 4) {
      std::vector<float>& sum = sums[w[i].group_size / 64];
      if (sum.empty()) {
        sum.assign(K / w[i].group_size, 0.0f);
        for (int64_t k = 0; k < K; ++k) sum[k / w[i].group_size] += x[k];
      }
      args.back().xsum = sum.data();
    }
    rows += w[i].N;
  }
  // One split of all the weights' rows over the cores (K weights a row, each used by M rows of
  // x): three small matmuls in a row would each be too small to split (a 192 x 576 k_proj ran
  // on one core).
  parallel_rows(rows, K * std::min<int64_t>(M, 8), [&](int64_t r0, int64_t r1) {
    int64_t first = 0;
    for (const QArgs& a : args) {
      const int64_t lo = std::max(r0, first), hi = std::min(r1, first + a.N);
      if (lo < hi) isa.rows(a, lo - first, hi - first);
      first += a.N;
    }
  });
}

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits,
                           mx::StreamOrDevice s) {
  if (bits != 4 && bits != 8) {
    throw std::invalid_argument("[mlxtune quantized_matmul] bits must be 4 or 8.");
  }
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    throw std::invalid_argument("[mlxtune quantized_matmul] group_size must be 32, 64 or 128.");
  }
  if (x.dtype() != mx::float32 || x.ndim() < 1 || w.ndim() != 2 || w.dtype() != mx::uint32 ||
      scales.ndim() != 2 || scales.shape() != biases.shape() ||
      scales.dtype() != biases.dtype() || scales.shape(0) != w.shape(0) ||
      x.shape(-1) != w.shape(1) * 32 / bits || scales.shape(1) * group_size != x.shape(-1)) {
    throw std::invalid_argument(
        "[mlxtune quantized_matmul] expects float32 x (..., K), uint32 (N, K * bits / 32) "
        "weights and (N, K / group_size) scales and biases of one float type.");
  }
  if (scales.dtype() != mx::float32 && scales.dtype() != mx::float16 &&
      scales.dtype() != mx::bfloat16) {
    throw std::invalid_argument(
        "[mlxtune quantized_matmul] scales must be float32/16 or bfloat16.");
  }
  auto shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(shape, mx::float32,
                   std::make_shared<QuantizedMatmul>(mx::to_stream(s), group_size, bits),
                   {x, w, scales, biases});
}

std::string matmul_isa() {
  return current_isa();
}

std::string set_matmul_isa(const std::string& isa) {
  if (isa != "avx512" && isa != "avx2" && isa != "baseline") {
    throw std::invalid_argument("[mlxtune set_matmul_isa] one of avx512, avx2, baseline.");
  }
  if (!cpu_has(isa)) {
    throw std::invalid_argument("[mlxtune set_matmul_isa] this CPU has no " + isa + ".");
  }
  std::string previous = current_isa();
  current_isa() = isa;
  return previous;
}

}  // namespace mlxtune
