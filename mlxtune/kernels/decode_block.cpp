// A transformer block of the standard architectures (llama, mistral, qwen2, qwen3) as two CPU
// ops for decoding: `decode_qkv` (norm, q/k/v projections, their biases, qwen3's q/k norms,
// RoPE) and `decode_out` (attention over the cache, output projection, residual, norm, SwiGLU
// MLP, residual). The KV cache update between the two stays mlx-lm's own, so every cache class
// (one sequence, a left-padded batch, the prefix cache's copies) works unchanged.
//
// Why: with one op per norm, matmul, rope and attention a decode step of SmolLM2-135M was ~750
// MLX ops, ~25 a block, and each op costs MLX a few microseconds to schedule and Python a few
// more to build: more than the arithmetic of a 576-wide model. These compute the same thing
// through the same routines as the single ops (qmatmul_raw, rms_norm_row, rope_apply,
// attention_raw, swiglu_raw), so their numbers equal the single ops' to float rounding.
// fp32 activations; inference only.

#include <algorithm>
#include <array>
#include <cstring>
#include <stdexcept>

#include "kernels.h"

namespace mlxtune {
namespace {

// The weight at inputs[first .. first + 2] (packed, scales, biases) with its quantization.
QWeight weight_at(const std::vector<mx::array>& inputs, int first, const QuantSpec& spec,
                  std::vector<char>* copies) {
  return qweight(inputs[first], inputs[first + 1], inputs[first + 2], spec.group_size, spec.bits,
                 copies);
}

const float* floats(const mx::array& a, std::vector<char>& copy) {
  return static_cast<const float*>(row_major(a, copy));
}

// The adapter inputs of a fused op, from inputs[first ..]: a pair per projection in spec.mask
// (A (slots, in, rank) or (in, rank), B likewise), then the rows' slots and scales when the spec
// says; views are copied to plain buffers.
struct LoraInputs {
  struct Pair {
    const float *a = nullptr, *b = nullptr;
    int64_t slots = 0, in = 0, rank = 0, out = 0;
  } pair[4];
  const int32_t* rows = nullptr;
  const float* scales = nullptr;
  std::vector<char> copies[10];
};

void lora_inputs(const std::vector<mx::array>& in, size_t first, const LoraSpec& spec,
                 int projections, LoraInputs& l) {
  int c = 0;
  for (int i = 0; i < projections; ++i) {
    if (!(spec.mask & (1 << i))) continue;
    const auto &a = in[first], &b = in[first + 1];
    first += 2;
    auto& p = l.pair[i];
    p.a = static_cast<const float*>(row_major(a, l.copies[c++]));
    p.b = static_cast<const float*>(row_major(b, l.copies[c++]));
    p.slots = a.ndim() == 3 ? a.shape(0) : 1;
    p.in = a.shape(-2);
    p.rank = a.shape(-1);
    p.out = b.shape(-1);
  }
  if (spec.rows) l.rows = static_cast<const int32_t*>(row_major(in[first++], l.copies[8]));
  if (spec.scales) l.scales = static_cast<const float*>(row_major(in[first], l.copies[9]));
}

// y (M x out) += scale * (z A[slot]) B[slot] for M rows of z (M x in), batch row m / L's slot
// and scale; a slot outside the stack adds nothing.
void add_lora(const float* z, int64_t M, int64_t L, const LoraInputs& l, int i, float* y) {
  const auto& p = l.pair[i];
  if (p.a == nullptr) return;
  std::vector<float> t(p.rank);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t slot = l.rows ? l.rows[m / L] : 0;
    if (slot < 0 || slot >= p.slots) continue;
    const float scale = l.scales ? l.scales[m / L] : 1.0f;
    std::fill(t.begin(), t.end(), 0.0f);
    const float* as = p.a + slot * p.in * p.rank;
    for (int64_t k = 0; k < p.in; ++k) {
      const float zk = z[m * p.in + k];
      for (int64_t r = 0; r < p.rank; ++r) t[r] += zk * as[k * p.rank + r];
    }
    const float* bs = p.b + slot * p.rank * p.out;
    float* ym = y + m * p.out;
    for (int64_t r = 0; r < p.rank; ++r) {
      const float tr = t[r] * scale;
      for (int64_t o = 0; o < p.out; ++o) ym[o] += tr * bs[r * p.out + o];
    }
  }
}

void rms_norm_rows(const float* x, int64_t rows, int64_t d, const float* w, float eps,
                   float* out) {
  for (int64_t r = 0; r < rows; ++r) rms_norm_row(x + r * d, 1, w, 1, d, eps, out + r * d);
}

// Rows (b, l) of `raw` ((B * L) x (heads * Dh)) into out (B, heads, L, Dh), RoPE'd at position
// offset[b] + l when `rope` (else copied).
void to_heads(const float* raw, int64_t B, int64_t L, int64_t heads, const QkvParams& p,
              const int32_t* offset, int64_t offsets, bool rope, float* out) {
  const int64_t Dh = p.head_dim, half = p.rope_dims / 2;
  std::vector<float> cos_t(L * half), sin_t(L * half);
  for (int64_t b = 0; b < B; ++b) {
    if (rope && (b == 0 || offsets > 1)) {
      rope_angles(static_cast<float>(offset[offsets > 1 ? b : 0]), L, p.rope_dims, p.rope_base,
                  p.rope_scale, cos_t.data(), sin_t.data());
    }
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t h = 0; h < heads; ++h) {
        const float* src = raw + ((b * L + l) * heads + h) * Dh;
        float* dst = out + ((b * heads + h) * L + l) * Dh;
        if (rope) {
          rope_apply(src, 1, dst, Dh, p.rope_dims, p.traditional, cos_t.data() + l * half,
                     sin_t.data() + l * half);
        } else {
          std::memcpy(dst, src, Dh * sizeof(float));
        }
      }
    }
  }
}

// Inputs: x (B, L, D), the norm's weight, the q, k and v weights (3 arrays each), the RoPE
// offset (1 or B int32), then the q/k/v biases when has_bias, then the q/k norms' weights when
// has_qk_norm, then the adapter inputs (LoraSpec). Outputs: q (B, H, L, Dh) and k, v
// (B, KVH, L, Dh), q and k rotated.
class DecodeQkv : public InferenceOnly {
 public:
  DecodeQkv(mx::Stream stream, const QkvParams& p) : InferenceOnly(stream), p_(p) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = encoder_for(inputs, outputs);
    encoder.dispatch([inputs, p = p_, q = outputs[0].data<float>(),
                      k = outputs[1].data<float>(), v = outputs[2].data<float>()]() {
      run(inputs, p, {q, k, v});
    });
  }

  const char* name() const override {
    return "MlxtuneDecodeQkv";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return p_ == static_cast<const DecodeQkv&>(other).p_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const int B = inputs[0].shape(0), L = inputs[0].shape(1);
    return {{B, p_.heads, L, p_.head_dim}, {B, p_.kv_heads, L, p_.head_dim},
            {B, p_.kv_heads, L, p_.head_dim}};
  }

 private:
  static void run(const std::vector<mx::array>& in, const QkvParams& p,
                  std::array<float*, 3> outs) {
    const int64_t B = in[0].shape(0), L = in[0].shape(1), D = in[0].shape(2), M = B * L;
    const int64_t Dh = p.head_dim, heads[3] = {p.heads, p.kv_heads, p.kv_heads};
    std::vector<char> copies[16];
    std::vector<float> normed(M * D);
    rms_norm_rows(floats(in[0], copies[0]), M, D, floats(in[1], copies[1]), p.eps,
                  normed.data());
    const int32_t* offset = in[11].data<int32_t>();
    std::vector<float> raw[3];
    QWeight w[3];
    float* ys[3];
    for (int j = 0; j < 3; ++j) {
      w[j] = weight_at(in, 2 + 3 * j, p.spec[j], copies + 2 + 3 * j);
      raw[j].resize(M * heads[j] * Dh);
      ys[j] = raw[j].data();
    }
    qmatmul_multi(normed.data(), M, w, ys, 3);
    const size_t lora_at = 12 + (p.has_bias ? 3 : 0) + (p.has_qk_norm ? 2 : 0);
    LoraInputs lora;
    lora_inputs(in, lora_at, p.lora, 3, lora);
    for (int j = 0; j < 3; ++j) {
      const int64_t N = heads[j] * Dh;
      if (p.has_bias) {
        const float* bias = floats(in[12 + j], copies[11]);
        for (int64_t r = 0; r < M; ++r) {
          for (int64_t n = 0; n < N; ++n) raw[j][r * N + n] += bias[n];
        }
      }
      add_lora(normed.data(), M, L, lora, j, ys[j]);
      if (p.has_qk_norm && j < 2) {  // qwen3: each head's vector normed before RoPE
        const float* nw = floats(in[(p.has_bias ? 15 : 12) + j], copies[12]);
        for (int64_t r = 0; r < M * heads[j]; ++r) {
          rms_norm_row(raw[j].data() + r * Dh, 1, nw, 1, Dh, p.qk_eps, raw[j].data() + r * Dh);
        }
      }
      to_heads(raw[j].data(), B, L, heads[j], p, offset, in[11].size(), j < 2, outs[j]);
    }
  }

  QkvParams p_;
};

// Inputs: x (B, L, D) (the block's input, the residual), q (B, H, L, Dh), keys and values
// (B, KVH, S, Dh, any strides: the cache's), the o, gate, up and down weights (3 arrays each)
// with the second norm's weight after o's, then the mask when there is one, then the adapter
// inputs (LoraSpec). Output: the block's output (B, L, D).
class DecodeOut : public InferenceOnly {
 public:
  DecodeOut(mx::Stream stream, const OutParams& p) : InferenceOnly(stream), p_(p) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = encoder_for(inputs, outputs);
    encoder.dispatch([inputs, p = p_, out = outputs[0].data<float>()]() { run(inputs, p, out); });
  }

  const char* name() const override {
    return "MlxtuneDecodeOut";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return p_ == static_cast<const DecodeOut&>(other).p_;
  }

 private:
  static void run(const std::vector<mx::array>& in, const OutParams& p, float* out) {
    const int64_t B = in[0].shape(0), L = in[0].shape(1), D = in[0].shape(2), M = B * L;
    const int64_t H = in[1].shape(1), Dh = in[1].shape(3);
    std::vector<char> copies[14];
    // Attention, written straight into (B, L, H, Dh): the layout o_proj reads.
    std::vector<float> attn(M * H * Dh);
    const int64_t strides[4] = {L * H * Dh, Dh, H * Dh, 1};
    std::optional<mx::array> mask;
    if (p.has_mask) mask = in[17];
    LoraInputs lora;
    lora_inputs(in, p.has_mask ? 18 : 17, p.lora, 4, lora);
    View4 keys = view4(in[2]), values = view4(in[3]);
    if (p.kv_length >= 0) keys.shape[2] = values.shape[2] = p.kv_length;
    attention_raw(view4(in[1]), keys, values, mask_view(mask), p.scale, p.causal, attn.data(),
                  strides);
    // h = x + o_proj(attn), kept in `out`.
    std::vector<float> proj(M * D);
    qmatmul_raw(attn.data(), M, weight_at(in, 4, p.spec[0], copies), proj.data());
    add_lora(attn.data(), M, L, lora, 0, proj.data());
    const float* x = floats(in[0], copies[3]);
    for (int64_t i = 0; i < M * D; ++i) out[i] = x[i] + proj[i];
    // out += down(silu(gate(n)) * up(n)), n = rms_norm(h).
    std::vector<float> normed(M * D);
    rms_norm_rows(out, M, D, floats(in[7], copies[4]), p.eps, normed.data());
    const QWeight gate_up[2] = {weight_at(in, 8, p.spec[1], copies + 5),
                                weight_at(in, 11, p.spec[2], copies + 8)};
    const int64_t F = gate_up[0].N;
    std::vector<float> g(M * F), u(M * F);
    float* const ys[2] = {g.data(), u.data()};
    qmatmul_multi(normed.data(), M, gate_up, ys, 2);
    add_lora(normed.data(), M, L, lora, 1, g.data());
    add_lora(normed.data(), M, L, lora, 2, u.data());
    swiglu_raw(g.data(), u.data(), g.data(), M * F);
    qmatmul_raw(g.data(), M, weight_at(in, 14, p.spec[3], copies + 11), proj.data());
    add_lora(g.data(), M, L, lora, 3, proj.data());
    for (int64_t i = 0; i < M * D; ++i) out[i] += proj[i];
  }

  OutParams p_;
};

void check_weights(const std::vector<mx::array>& w, size_t count, const char* op) {
  if (w.size() != count) {
    throw std::invalid_argument(std::string("[mlxtune ") + op + "] expects " +
                                std::to_string(count) + " weight arrays.");
  }
  for (size_t i = 0; i < count; i += 3) {
    if (w[i].dtype() != mx::uint32 || w[i].ndim() != 2 || w[i + 1].shape() != w[i + 2].shape() ||
        w[i + 1].shape(0) != w[i].shape(0)) {
      throw std::invalid_argument(std::string("[mlxtune ") + op +
                                  "] weights: (packed uint32, scales, biases) triples.");
    }
  }
}

// Input width of weight triple i (packed uint32 words x 32 / bits), checked against its scales.
int64_t in_width(const std::vector<mx::array>& w, size_t i, const QuantSpec& spec,
                 const char* op) {
  const int64_t K = static_cast<int64_t>(w[i].shape(1)) * 32 / spec.bits;
  if (static_cast<int64_t>(w[i + 1].shape(1)) * spec.group_size != K) {
    throw std::invalid_argument(std::string("[mlxtune ") + op +
                                "] scales do not match the weights' group size.");
  }
  return K;
}

void check_x(const mx::array& x, const char* op) {
  if (x.dtype() != mx::float32 || x.ndim() != 3) {
    throw std::invalid_argument(std::string("[mlxtune ") + op + "] expects float32 x (B, L, D).");
  }
}

// The adapter inputs checked against the spec and the projections' (in, out) sizes.
void check_lora(const std::vector<mx::array>& lora, const LoraSpec& spec,
                const std::vector<std::pair<int64_t, int64_t>>& dims, int64_t batch,
                const char* op) {
  size_t at = 0;
  auto fail = [op](const std::string& what) {
    throw std::invalid_argument(std::string("[mlxtune ") + op + "] adapter inputs: " + what);
  };
  for (size_t i = 0; i < dims.size(); ++i) {
    if (!(spec.mask & (1 << i))) continue;
    if (at + 2 > lora.size()) fail("fewer arrays than lora_mask says");
    const auto &a = lora[at], &b = lora[at + 1];
    at += 2;
    const bool stacked = a.ndim() == 3;
    if (a.ndim() != b.ndim() || (a.ndim() != 2 && !stacked) || a.dtype() != mx::float32 ||
        b.dtype() != mx::float32 || (stacked && a.shape(0) != b.shape(0)) ||
        a.shape(-1) != b.shape(-2) || a.shape(-2) != dims[i].first ||
        b.shape(-1) != dims[i].second) {
      fail("A ([slots,] in, rank) and B ([slots,] rank, out), float32, fitting the projection");
    }
  }
  for (int k = 0; k < 2; ++k) {
    if (!(k == 0 ? spec.rows : spec.scales)) continue;
    if (at >= lora.size()) fail("fewer arrays than lora_rows / lora_scales say");
    const auto& v = lora[at++];
    const auto want = k == 0 ? mx::int32 : mx::float32;
    if (v.size() != static_cast<size_t>(batch) || v.dtype() != want) {
      fail("one int32 slot and one float32 scale per batch row");
    }
  }
  if (at != lora.size()) fail("more arrays than the spec says");
}

}  // namespace

std::vector<mx::array> decode_qkv(const mx::array& x, const mx::array& norm,
                                  const std::vector<mx::array>& weights, const mx::array& offset,
                                  const std::vector<mx::array>& extras, const QkvParams& p,
                                  const std::vector<mx::array>& lora, mx::StreamOrDevice s) {
  check_x(x, "decode_qkv");
  check_weights(weights, 9, "decode_qkv");
  const size_t want = (p.has_bias ? 3 : 0) + (p.has_qk_norm ? 2 : 0);
  if (extras.size() != want || norm.ndim() != 1 || norm.shape(0) != x.shape(2) ||
      offset.ndim() > 1 || (offset.size() != 1 && offset.size() != static_cast<size_t>(x.shape(0))) ||
      weights[0].shape(0) != p.heads * p.head_dim ||
      weights[3].shape(0) != p.kv_heads * p.head_dim ||
      weights[6].shape(0) != p.kv_heads * p.head_dim || p.rope_dims > p.head_dim ||
      p.rope_dims % 2 != 0 || in_width(weights, 0, p.spec[0], "decode_qkv") != x.shape(2) ||
      in_width(weights, 3, p.spec[1], "decode_qkv") != x.shape(2) ||
      in_width(weights, 6, p.spec[2], "decode_qkv") != x.shape(2)) {
    throw std::invalid_argument(
        "[mlxtune decode_qkv] weights, offset or extras do not match the heads.");
  }
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs = {x, norm};
  inputs.insert(inputs.end(), weights.begin(), weights.end());
  inputs.push_back(mx::astype(offset, mx::int32, stream));
  inputs.insert(inputs.end(), extras.begin(), extras.end());
  const int64_t D = x.shape(2), kv = p.kv_heads * p.head_dim;
  check_lora(lora, p.lora, {{D, p.heads * p.head_dim}, {D, kv}, {D, kv}}, x.shape(0),
             "decode_qkv");
  inputs.insert(inputs.end(), lora.begin(), lora.end());
  const int B = x.shape(0), L = x.shape(1);
  return mx::array::make_arrays(
      {{B, p.heads, L, p.head_dim}, {B, p.kv_heads, L, p.head_dim},
       {B, p.kv_heads, L, p.head_dim}},
      {mx::float32, mx::float32, mx::float32}, std::make_shared<DecodeQkv>(stream, p), inputs);
}

mx::array decode_out(const mx::array& x, const mx::array& q, const mx::array& keys,
                     const mx::array& values, const std::vector<mx::array>& weights,
                     const mx::array& norm, const std::optional<mx::array>& mask,
                     const OutParams& params, const std::vector<mx::array>& lora,
                     mx::StreamOrDevice s) {
  OutParams p = params;
  p.has_mask = mask.has_value();
  check_x(x, "decode_out");
  check_weights(weights, 12, "decode_out");
  for (const auto* a : {&q, &keys, &values}) {
    if (a->dtype() != mx::float32 || a->ndim() != 4) {
      throw std::invalid_argument("[mlxtune decode_out] q, keys, values: float32 rank 4.");
    }
  }
  const int64_t D = x.shape(2), F = weights[3].shape(0);
  if (keys.shape() != values.shape() || q.shape(0) != keys.shape(0) ||
      q.shape(3) != keys.shape(3) || q.shape(1) % keys.shape(1) != 0 ||
      q.shape(0) != x.shape(0) || q.shape(2) != x.shape(1) ||
      in_width(weights, 0, p.spec[0], "decode_out") != q.shape(1) * q.shape(3) ||
      weights[0].shape(0) != D || in_width(weights, 3, p.spec[1], "decode_out") != D ||
      in_width(weights, 6, p.spec[2], "decode_out") != D || weights[6].shape(0) != F ||
      in_width(weights, 9, p.spec[3], "decode_out") != F || weights[9].shape(0) != D ||
      norm.ndim() != 1 || norm.shape(0) != D) {
    throw std::invalid_argument(
        "[mlxtune decode_out] q, keys, values and the weights do not match.");
  }
  if (p.kv_length > keys.shape(2)) {
    throw std::invalid_argument("[mlxtune decode_out] kv_length beyond the keys.");
  }
  if (mask && (mask->ndim() > 4 || (mask->dtype() != mx::bool_ && mask->dtype() != mx::float32))) {
    throw std::invalid_argument("[mlxtune decode_out] mask: bool or float32, at most 4-D.");
  }
  std::vector<mx::array> inputs = {x, q, keys, values};
  inputs.insert(inputs.end(), weights.begin(), weights.begin() + 3);
  inputs.push_back(norm);
  inputs.insert(inputs.end(), weights.begin() + 3, weights.end());
  if (mask) inputs.push_back(*mask);
  auto stream = mx::to_stream(s);
  const int64_t HD = q.shape(1) * q.shape(3);
  check_lora(lora, p.lora, {{HD, D}, {D, F}, {D, F}, {F, D}}, x.shape(0), "decode_out");
  inputs.insert(inputs.end(), lora.begin(), lora.end());
  return mx::array(x.shape(), mx::float32, std::make_shared<DecodeOut>(stream, p), inputs);
}

BlockParams block_call(const BlockParams& params, bool causal, int qkv_mask, int out_mask,
                       bool rows, bool scales) {
  BlockParams p = params;
  p.out.causal = causal;
  p.qkv.lora = {qkv_mask, qkv_mask != 0 && rows, qkv_mask != 0 && scales};
  p.out.lora = {out_mask, out_mask != 0 && rows, out_mask != 0 && scales};
  return p;
}

std::vector<mx::array> decode_block(const mx::array& x, const BlockParams& p,
                                    const mx::array& norm_in, const mx::array& norm_post,
                                    const std::vector<mx::array>& weights,
                                    const mx::array& offset, const std::vector<mx::array>& extras,
                                    const mx::array& keys, const mx::array& values, int prev,
                                    const std::optional<mx::array>& mask,
                                    const std::vector<mx::array>& lora_qkv,
                                    const std::vector<mx::array>& lora_out,
                                    mx::StreamOrDevice s) {
  check_x(x, "decode_block");
  check_weights(weights, 21, "decode_block");
  const int L = x.shape(1);
  for (const auto* a : {&keys, &values}) {
    if (a->dtype() != mx::float32 || a->ndim() != 4 || a->shape(0) != x.shape(0) ||
        a->shape(1) != p.qkv.kv_heads || a->shape(2) != keys.shape(2) ||
        a->shape(3) != p.qkv.head_dim || prev < 0 || prev + L > a->shape(2)) {
      throw std::invalid_argument(
          "[mlxtune decode_block] keys, values: float32 (B, kv_heads, room, head_dim) buffers "
          "with room for the new tokens after prev.");
    }
  }
  const std::vector<mx::array> first(weights.begin(), weights.begin() + 9),
      second(weights.begin() + 9, weights.end());
  auto qkv = decode_qkv(x, norm_in, first, offset, extras, p.qkv, lora_qkv, s);
  mx::Shape start{0, 0, prev, 0}, stop = keys.shape();
  stop[2] = prev + L;
  auto keys_all = mx::slice_update(keys, qkv[1], start, stop, s);
  auto values_all = mx::slice_update(values, qkv[2], start, stop, s);
  // Attention reads the buffers' first prev + L positions in place (no slice ops).
  OutParams out = p.out;
  out.kv_length = prev + L;
  auto h = decode_out(x, qkv[0], keys_all, values_all, second, norm_post, mask, out, lora_out, s);
  return {h, keys_all, values_all};
}

std::vector<mx::array> decode_stack(const mx::array& x, const std::vector<BlockParams>& params,
                                    const std::vector<mx::array>& norms,
                                    const std::vector<std::vector<mx::array>>& weights,
                                    const mx::array& offset,
                                    const std::vector<std::vector<mx::array>>& extras,
                                    const std::vector<mx::array>& keys,
                                    const std::vector<mx::array>& values,
                                    const std::vector<int>& prev,
                                    const std::optional<mx::array>& mask, bool causal,
                                    const StackAdapters& adapters, mx::StreamOrDevice s) {
  const size_t n = params.size();
  for (size_t count : {norms.size() / 2, weights.size(), extras.size(),
                       keys.size(), values.size(), prev.size(), adapters.qkv.size(),
                       adapters.out.size(), adapters.qkv_masks.size(),
                       adapters.out_masks.size(), adapters.rows.size(), adapters.scales.size()}) {
    if (count != n || norms.size() % 2 != 0) {
      throw std::invalid_argument("[mlxtune decode_stack] every list needs one entry a layer "
                                  "(norms: two).");
    }
  }
  mx::array h = x;
  std::vector<mx::array> out(2 * n + 1, x);
  for (size_t i = 0; i < n; ++i) {
    const BlockParams p = block_call(params[i], causal, adapters.qkv_masks[i],
                                     adapters.out_masks[i], adapters.rows[i] != 0,
                                     adapters.scales[i] != 0);
    auto block = decode_block(h, p, norms[2 * i], norms[2 * i + 1], weights[i], offset,
                              extras[i], keys[i], values[i], prev[i], mask, adapters.qkv[i],
                              adapters.out[i], s);
    h = block[0];
    out[1 + i] = block[1];
    out[1 + n + i] = block[2];
  }
  out[0] = h;
  return out;
}

}  // namespace mlxtune
