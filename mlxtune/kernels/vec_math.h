// Eight-lane float helpers the kernels share: GCC vector types and a vectorized exp.
#pragma once

#include <cstdint>
#include <cstring>

namespace mlxtune {

typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));

// 2^n for whole-valued n in [-126, 127], from its exponent bits.
__attribute__((always_inline)) inline float pow2(float n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// The same for each lane of a float vector of any width (v8f, or an instruction set's own).
template <typename V>
__attribute__((always_inline)) inline V pow2(V n) {
  typedef int32_t I __attribute__((vector_size(sizeof(V))));
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Cephes' expf, as cpu_math.exp: e^x = 2^n e^r with |r| <= ln(2)/2, x clipped to [-87, 88].
// V is float or a float vector (the same code, a lane at a time).
template <typename V>
__attribute__((always_inline)) inline V fast_exp(V x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const V n = (x * 1.4426950408889634f + 12582912.0f) - 12582912.0f;  // round to nearest
  const V r = x - n * 0.693359375f - n * -2.12194440e-4f;
  V p = x * 0.0f + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return (p * r * r + r + 1.0f) * pow2(n);
}

}  // namespace mlxtune
