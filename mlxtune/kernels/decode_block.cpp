// A transformer block of the standard architectures (llama, mistral, qwen2, qwen3) as two CPU
// ops for decoding: `decode_qkv` (norm, q/k/v projections, their biases, qwen3's q/k norms,
// RoPE) and `decode_out` (attention over the cache, output projection, residual, norm, SwiGLU
// MLP, residual). The KV cache update between the two stays mlx-lm's own, so every cache class
// (one sequence, a left-padded batch, the prefix cache's copies) works unchanged. `decode_block`
// makes a block's two ops and its KV writes in one call; `decode_stack` is every block of a
// model as one op, writing mlx-lm's KV buffers where its slice_update would (in place when
// nothing else holds them, as MLX donates), with the weights gathered once (`stack_weights`).
//
// Why: with one op per norm, matmul, rope and attention a decode step of SmolLM2-135M was ~750
// MLX ops, ~25 a block, and each op costs MLX a few microseconds to schedule and Python a few
// more to build: more than the arithmetic of a 576-wide model. These compute the same thing
// through the same routines as the single ops (qmatmul_raw, rms_norm_row, rope_apply,
// attention_raw, swiglu_raw), so their numbers equal the single ops' to float rounding.
// fp32 activations; inference only.

#include <algorithm>
#include <array>
#include <initializer_list>
#include <cstring>
#include <stdexcept>

#include "kernels.h"

namespace mlxtune {
namespace {

// The weight at inputs[first .. first + 2] (packed, scales, biases) with its quantization.
QWeight weight_at(const mx::array* inputs, int first, const QuantSpec& spec,
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

void lora_inputs(const mx::array* in, const LoraSpec& spec, int projections, LoraInputs& l) {
  size_t first = 0;
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

// What decode_qkv reads besides x: pointers into the op's inputs or into decode_stack's layers.
struct QkvIn {
  const mx::array* norm;     // the input norm's weight
  const mx::array* weights;  // the q, k and v triples
  const mx::array* offset;   // RoPE's, int32: one, or one per batch row
  const mx::array* extras;   // the q/k/v biases, then the q/k norms' weights, as the params say
  const mx::array* lora;     // the adapter arrays (LoraSpec)
};

// decode_qkv's computation on x (B, L, D) = `shape`.
void qkv_run(const QkvIn& in, const mx::Shape& shape, const float* x, const QkvParams& p,
             std::array<float*, 3> outs) {
  const int64_t B = shape[0], L = shape[1], D = shape[2], M = B * L;
  const int64_t Dh = p.head_dim, heads[3] = {p.heads, p.kv_heads, p.kv_heads};
  std::vector<char> copies[16];
  std::vector<float> normed(M * D);
  rms_norm_rows(x, M, D, floats(*in.norm, copies[1]), p.eps, normed.data());
  const int32_t* offset = in.offset->data<int32_t>();
  std::vector<float> raw[3];
  QWeight w[3];
  float* ys[3];
  for (int j = 0; j < 3; ++j) {
    w[j] = weight_at(in.weights, 3 * j, p.spec[j], copies + 2 + 3 * j);
    raw[j].resize(M * heads[j] * Dh);
    ys[j] = raw[j].data();
  }
  qmatmul_multi(normed.data(), M, w, ys, 3);
  LoraInputs lora;
  lora_inputs(in.lora, p.lora, 3, lora);
  for (int j = 0; j < 3; ++j) {
    const int64_t N = heads[j] * Dh;
    if (p.has_bias) {
      const float* bias = floats(in.extras[j], copies[11]);
      for (int64_t r = 0; r < M; ++r) {
        for (int64_t n = 0; n < N; ++n) raw[j][r * N + n] += bias[n];
      }
    }
    add_lora(normed.data(), M, L, lora, j, ys[j]);
    if (p.has_qk_norm && j < 2) {  // qwen3: each head's vector normed before RoPE
      const float* nw = floats(in.extras[(p.has_bias ? 3 : 0) + j], copies[12]);
      for (int64_t r = 0; r < M * heads[j]; ++r) {
        rms_norm_row(raw[j].data() + r * Dh, 1, nw, 1, Dh, p.qk_eps, raw[j].data() + r * Dh);
      }
    }
    to_heads(raw[j].data(), B, L, heads[j], p, offset, in.offset->size(), j < 2, outs[j]);
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
      std::vector<char> copy;
      const size_t extras = (p.has_bias ? 3 : 0) + (p.has_qk_norm ? 2 : 0);
      const QkvIn in{&inputs[1], &inputs[2], &inputs[11], &inputs[12], &inputs[12 + extras]};
      qkv_run(in, inputs[0].shape(), floats(inputs[0], copy), p, {q, k, v});
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
  QkvParams p_;
};

// What decode_out reads besides x, q and the keys and values: pointers into the op's inputs or
// into decode_stack's layers.
struct OutIn {
  const mx::array* o;     // o_proj's triple
  const mx::array* norm;  // the post-attention norm's weight
  const mx::array* mlp;   // the gate, up and down triples
  const mx::array* mask;  // when the params say there is one
  const mx::array* lora;  // the adapter arrays (LoraSpec)
};

// decode_out's computation on x (B, L, D) = `shape` (the residual), q and the keys and values.
void out_run(const OutIn& in, const mx::Shape& shape, const float* x, const View4& q, View4 keys,
             View4 values, const OutParams& p, float* out) {
  const int64_t B = shape[0], L = shape[1], D = shape[2], M = B * L;
  const int64_t H = q.shape[1], Dh = q.shape[3];
  std::vector<char> copies[14];
  // Attention, written straight into (B, L, H, Dh): the layout o_proj reads.
  std::vector<float> attn(M * H * Dh);
  const int64_t strides[4] = {L * H * Dh, Dh, H * Dh, 1};
  std::optional<mx::array> mask;
  if (p.has_mask) mask = *in.mask;
  LoraInputs lora;
  lora_inputs(in.lora, p.lora, 4, lora);
  if (p.kv_length >= 0) keys.shape[2] = values.shape[2] = p.kv_length;
  attention_raw(q, keys, values, mask_view(mask), p.scale, p.causal, attn.data(), strides);
  // h = x + o_proj(attn), kept in `out`.
  std::vector<float> proj(M * D);
  qmatmul_raw(attn.data(), M, weight_at(in.o, 0, p.spec[0], copies), proj.data());
  add_lora(attn.data(), M, L, lora, 0, proj.data());
  for (int64_t i = 0; i < M * D; ++i) out[i] = x[i] + proj[i];
  // out += down(silu(gate(n)) * up(n)), n = rms_norm(h).
  std::vector<float> normed(M * D);
  rms_norm_rows(out, M, D, floats(*in.norm, copies[4]), p.eps, normed.data());
  const QWeight gate_up[2] = {weight_at(in.mlp, 0, p.spec[1], copies + 5),
                              weight_at(in.mlp, 3, p.spec[2], copies + 8)};
  const int64_t F = gate_up[0].N;
  std::vector<float> g(M * F), u(M * F);
  float* const ys[2] = {g.data(), u.data()};
  qmatmul_multi(normed.data(), M, gate_up, ys, 2);
  add_lora(normed.data(), M, L, lora, 1, g.data());
  add_lora(normed.data(), M, L, lora, 2, u.data());
  swiglu_raw(g.data(), u.data(), g.data(), M * F);
  qmatmul_raw(g.data(), M, weight_at(in.mlp, 6, p.spec[3], copies + 11), proj.data());
  add_lora(g.data(), M, L, lora, 3, proj.data());
  for (int64_t i = 0; i < M * D; ++i) out[i] += proj[i];
}

// Inputs: x (B, L, D) (the block's input, the residual), q (B, H, L, Dh), keys and values
// (B, KVH, S, Dh, any strides: the cache's), the o, gate, up and down weights (3 arrays each)
// with the second norm's weight after o's, then the mask when there is one, then the adapter
// inputs (LoraSpec). Output: the block's output (B, L, D).
class DecodeOut : public InferenceOnly {
 public:
  DecodeOut(mx::Stream stream, const OutParams& p) : InferenceOnly(stream), p_(p) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = encoder_for(inputs, outputs);
    encoder.dispatch([inputs, p = p_, out = outputs[0].data<float>()]() {
      std::vector<char> copy;
      const OutIn in{&inputs[4], &inputs[7], &inputs[8], &inputs[17],
                     &inputs[p.has_mask ? 18 : 17]};
      out_run(in, inputs[0].shape(), floats(inputs[0], copy), view4(inputs[1]), view4(inputs[2]),
              view4(inputs[3]), p, out);
    });
  }

  const char* name() const override {
    return "MlxtuneDecodeOut";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return p_ == static_cast<const DecodeOut&>(other).p_;
  }

 private:
  OutParams p_;
};

// A KV buffer can become its output in place (MLX's donation) when nothing but this op holds the
// array and nothing else shares its memory. MLX's is_donatable() cannot say so for a
// multi-output op (each output holds the op's inputs), so the array's holders are counted
// against `probe`, an input this op alone holds.
bool only_this_op_holds(const mx::array& buffer, const mx::array& probe) {
  // mx::array is one shared_ptr to its descriptor; its count is the number of holders.
  static_assert(sizeof(mx::array) == sizeof(std::shared_ptr<void>));
  auto holders = [](const mx::array& a) {
    return reinterpret_cast<const std::shared_ptr<void>&>(a).use_count();
  };
  return buffer.flags().row_contiguous && holders(buffer) == holders(probe);
}

bool memory_unshared(const mx::array& buffer) {
  return buffer.data_shared_ptr().use_count() == 1 && buffer.data_shared_ptr()->is_owned();
}

// Every block of a decoder stack in one op (decode_stack): per layer decode_qkv's computation,
// the new keys and values written at [prev, prev + L) of its buffers, decode_out's computation,
// the blocks chained in the op's own buffers. The weights come from the stack (StackWeights);
// the inputs are below (OFFSET, MASK, BUFFERS). Outputs: h, every layer's keys buffer, every
// layer's values buffer: the input buffers with the new positions written, in place where only
// this op holds them, else into copies.
class DecodeStack : public InferenceOnly {
 public:
  // A call's settings: the stack, each layer's settings for this call, where each layer's
  // adapter arrays start in the inputs (its q/k/v half's, then its o/MLP half's), prev.
  struct Call {
    std::shared_ptr<const StackWeights> stack;
    std::vector<BlockParams> params;
    std::vector<int> lora_at;
    int prev = 0;

    bool operator==(const Call&) const = default;
  };

  DecodeStack(mx::Stream stream, Call call)
      : InferenceOnly(stream), call_(std::make_shared<const Call>(std::move(call))) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    outputs[0].set_data(mx::allocator::malloc(outputs[0].nbytes()));
    const size_t buffers = outputs.size() - 1;
    // While the previous step still runs (generation builds and queues the next step before the
    // last one is done), MLX keeps that step's outputs' memory, these buffers, until it ends:
    // wait for it rather than copy every buffer (8 rows of SmolLM2: ~94 MB a step).
    auto ours = [&](size_t j) { return only_this_op_holds(inputs[BUFFERS + j], inputs[1]); };
    for (size_t j = 0; j < buffers; ++j) {
      if (ours(j) && !memory_unshared(inputs[BUFFERS + j])) {
        mx::synchronize(stream());
        break;
      }
    }
    std::vector<float*> data(buffers);
    std::vector<char> copied(buffers, 0);
    for (size_t j = 0; j < buffers; ++j) {
      const mx::array& in = inputs[BUFFERS + j];
      mx::array& out = outputs[1 + j];
      if (ours(j) && memory_unshared(in)) {
        out.copy_shared_buffer(in);
      } else {
        out.set_data(mx::allocator::malloc(out.nbytes()));
        copied[j] = 1;
      }
      data[j] = out.data<float>();
    }
    // The task runs on MLX's CPU stream after this op may be gone: it holds what it reads.
    encoder.dispatch([call = call_, inputs, h = outputs[0].data<float>(), data, copied]() {
      run(*call, inputs, h, data, copied);
    });
  }

  const char* name() const override {
    return "MlxtuneDecodeStack";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return *call_ == *static_cast<const DecodeStack&>(other).call_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    std::vector<mx::Shape> shapes = {inputs[0].shape()};
    for (size_t j = 0; j < 2 * call_->params.size(); ++j) {
      shapes.push_back(inputs[BUFFERS + j].shape());
    }
    return shapes;
  }

  // Inputs: x, the probe (only_this_op_holds), the RoPE offset (int32), the mask (x when there is
  // none), every layer's keys buffer, every layer's values buffer, then the adapter arrays.
  static constexpr int OFFSET = 2, MASK = 3, BUFFERS = 4;

 private:
  static void run(const Call& call, const std::vector<mx::array>& in, float* h,
                  const std::vector<float*>& buffers, const std::vector<char>& copied) {
    const size_t n = call.params.size();
    const mx::Shape& shape = in[0].shape();
    const int64_t B = shape[0], L = shape[1], M = B * L;
    for (size_t j = 0; j < 2 * n; ++j) {
      if (copied[j]) copy_rows(view4(in[BUFFERS + j]), buffers[j]);
    }
    std::vector<char> copy;
    const float* x = floats(in[0], copy);
    std::vector<float> between[2] = {std::vector<float>(M * shape[2]),
                                     std::vector<float>(M * shape[2])};
    for (size_t i = 0; i < n; ++i) {
      const StackLayer& w = call.stack->layers[i];
      const BlockParams& p = call.params[i];
      const int64_t H = p.qkv.heads, KVH = p.qkv.kv_heads, Dh = p.qkv.head_dim;
      std::vector<float> q(M * H * Dh), k(M * KVH * Dh), v(M * KVH * Dh);
      const QkvIn qkv{&w.norms[0], w.qkv.data(), &in[OFFSET], w.extras.data(),
                      in.data() + call.lora_at[2 * i]};
      qkv_run(qkv, shape, x, p.qkv, {q.data(), k.data(), v.data()});
      const int64_t S = in[BUFFERS + i].shape(2);
      write_positions(k.data(), B * KVH, L * Dh, S * Dh, call.prev * Dh, buffers[i]);
      write_positions(v.data(), B * KVH, L * Dh, S * Dh, call.prev * Dh, buffers[n + i]);
      const View4 qv{q.data(), {B, H, L, Dh}, {H * L * Dh, L * Dh, Dh, 1}};
      const View4 kv{buffers[i], {B, KVH, S, Dh}, {KVH * S * Dh, S * Dh, Dh, 1}};
      View4 vv = kv;
      vv.data = buffers[n + i];
      const OutIn out{w.out.data(), &w.norms[1], w.out.data() + 3, &in[MASK],
                      in.data() + call.lora_at[2 * i + 1]};
      float* y = i + 1 == n ? h : between[i % 2].data();
      out_run(out, shape, x, qv, kv, vv, p.out, y);
      x = y;
    }
  }

  // The new tokens (rows of `width` floats, one per (batch row, kv head)) into a buffer whose
  // rows are `stride` apart, `at` floats in (prev positions): the write mlx-lm's slice_update
  // makes.
  static void write_positions(const float* rows, int64_t count, int64_t width, int64_t stride,
                              int64_t at, float* buffer) {
    for (int64_t r = 0; r < count; ++r) {
      std::memcpy(buffer + r * stride + at, rows + r * width, width * sizeof(float));
    }
  }

  // A buffer another holder keeps: its contents into this op's own (row-major) copy.
  static void copy_rows(const View4& a, float* out) {
    const int64_t* n = a.shape;
    if (a.strides[3] == 1 && a.strides[2] == n[3] && a.strides[1] == n[2] * n[3] &&
        a.strides[0] == n[1] * n[2] * n[3]) {
      std::memcpy(out, a.data, n[0] * a.strides[0] * sizeof(float));
      return;
    }
    for (int64_t i = 0; i < a.shape[0]; ++i) {
      for (int64_t j = 0; j < a.shape[1]; ++j) {
        for (int64_t k = 0; k < a.shape[2]; ++k) {
          const float* src = a.data + i * a.strides[0] + j * a.strides[1] + k * a.strides[2];
          for (int64_t l = 0; l < a.shape[3]; ++l) *out++ = src[l * a.strides[3]];
        }
      }
    }
  }

  std::shared_ptr<const Call> call_;
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
                std::initializer_list<std::pair<int64_t, int64_t>> dims, int64_t batch,
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
        a.shape(-1) != b.shape(-2) || a.shape(-2) != dims.begin()[i].first ||
        b.shape(-1) != dims.begin()[i].second) {
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

// decode_qkv's arguments checked (`op` names the caller in the message).
void check_qkv(const mx::array& x, const mx::array& norm, const std::vector<mx::array>& weights,
               const mx::array& offset, const std::vector<mx::array>& extras, const QkvParams& p,
               const std::vector<mx::array>& lora, const char* op) {
  check_x(x, op);
  check_weights(weights, 9, op);
  const size_t want = (p.has_bias ? 3 : 0) + (p.has_qk_norm ? 2 : 0);
  if (extras.size() != want || norm.ndim() != 1 || norm.shape(0) != x.shape(2) ||
      offset.ndim() > 1 ||
      (offset.size() != 1 && offset.size() != static_cast<size_t>(x.shape(0))) ||
      weights[0].shape(0) != p.heads * p.head_dim ||
      weights[3].shape(0) != p.kv_heads * p.head_dim ||
      weights[6].shape(0) != p.kv_heads * p.head_dim || p.rope_dims > p.head_dim ||
      p.rope_dims % 2 != 0 || in_width(weights, 0, p.spec[0], op) != x.shape(2) ||
      in_width(weights, 3, p.spec[1], op) != x.shape(2) ||
      in_width(weights, 6, p.spec[2], op) != x.shape(2)) {
    throw std::invalid_argument(std::string("[mlxtune ") + op +
                                "] weights, offset or extras do not match the heads.");
  }
  const int64_t D = x.shape(2), kv = p.kv_heads * p.head_dim;
  check_lora(lora, p.lora, {{D, p.heads * p.head_dim}, {D, kv}, {D, kv}}, x.shape(0), op);
}

// decode_out's arguments checked, q by its shape (`op` names the caller in the message).
void check_out(const mx::array& x, const std::array<int64_t, 4>& q, const mx::array& keys,
               const mx::array& values, const std::vector<mx::array>& weights,
               const mx::array& norm, const std::optional<mx::array>& mask, const OutParams& p,
               const std::vector<mx::array>& lora, const char* op) {
  auto fail = [op](const char* what) {
    throw std::invalid_argument(std::string("[mlxtune ") + op + "] " + what);
  };
  check_x(x, op);
  check_weights(weights, 12, op);
  for (const auto* a : {&keys, &values}) {
    if (a->dtype() != mx::float32 || a->ndim() != 4) {
      fail("q, keys, values: float32 rank 4.");
    }
  }
  const int64_t D = x.shape(2), F = weights[3].shape(0);
  if (keys.shape() != values.shape() || q[0] != keys.shape(0) || q[3] != keys.shape(3) ||
      q[1] % keys.shape(1) != 0 || q[0] != x.shape(0) || q[2] != x.shape(1) ||
      in_width(weights, 0, p.spec[0], op) != q[1] * q[3] || weights[0].shape(0) != D ||
      in_width(weights, 3, p.spec[1], op) != D || in_width(weights, 6, p.spec[2], op) != D ||
      weights[6].shape(0) != F || in_width(weights, 9, p.spec[3], op) != F ||
      weights[9].shape(0) != D || norm.ndim() != 1 || norm.shape(0) != D) {
    fail("q, keys, values and the weights do not match.");
  }
  if (p.kv_length > keys.shape(2)) {
    fail("kv_length beyond the keys.");
  }
  if (mask && (mask->ndim() > 4 || (mask->dtype() != mx::bool_ && mask->dtype() != mx::float32))) {
    fail("mask: bool or float32, at most 4-D.");
  }
  check_lora(lora, p.lora, {{q[1] * q[3], D}, {D, F}, {D, F}, {F, D}}, x.shape(0), op);
}

// A block's KV cache buffers checked: float32 (B, kv_heads, room, head_dim) with room for x's
// tokens after prev.
void check_buffers(const mx::array& x, const QkvParams& p, const mx::array& keys,
                   const mx::array& values, int prev, const char* op) {
  for (const auto* a : {&keys, &values}) {
    if (a->dtype() != mx::float32 || a->ndim() != 4 || a->shape(0) != x.shape(0) ||
        a->shape(1) != p.kv_heads || a->shape(2) != keys.shape(2) ||
        a->shape(3) != p.head_dim || prev < 0 || prev + x.shape(1) > a->shape(2)) {
      throw std::invalid_argument(
          std::string("[mlxtune ") + op +
          "] keys, values: float32 (B, kv_heads, room, head_dim) buffers with room for the "
          "new tokens after prev.");
    }
  }
}

}  // namespace

std::vector<mx::array> decode_qkv(const mx::array& x, const mx::array& norm,
                                  const std::vector<mx::array>& weights, const mx::array& offset,
                                  const std::vector<mx::array>& extras, const QkvParams& p,
                                  const std::vector<mx::array>& lora, mx::StreamOrDevice s) {
  check_qkv(x, norm, weights, offset, extras, p, lora, "decode_qkv");
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs = {x, norm};
  inputs.insert(inputs.end(), weights.begin(), weights.end());
  inputs.push_back(mx::astype(offset, mx::int32, stream));
  inputs.insert(inputs.end(), extras.begin(), extras.end());
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
  if (q.dtype() != mx::float32 || q.ndim() != 4) {
    throw std::invalid_argument("[mlxtune decode_out] q, keys, values: float32 rank 4.");
  }
  check_out(x, {q.shape(0), q.shape(1), q.shape(2), q.shape(3)}, keys, values, weights, norm,
            mask, p, lora, "decode_out");
  std::vector<mx::array> inputs = {x, q, keys, values};
  inputs.insert(inputs.end(), weights.begin(), weights.begin() + 3);
  inputs.push_back(norm);
  inputs.insert(inputs.end(), weights.begin() + 3, weights.end());
  if (mask) inputs.push_back(*mask);
  inputs.insert(inputs.end(), lora.begin(), lora.end());
  return mx::array(x.shape(), mx::float32, std::make_shared<DecodeOut>(mx::to_stream(s), p),
                   inputs);
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
  check_buffers(x, p.qkv, keys, values, prev, "decode_block");
  const int L = x.shape(1);
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

std::shared_ptr<const StackWeights> stack_weights(
    const std::vector<BlockParams>& params, const std::vector<mx::array>& norms,
    const std::vector<std::vector<mx::array>>& weights,
    const std::vector<std::vector<mx::array>>& extras) {
  const size_t n = params.size();
  if (n == 0 || norms.size() != 2 * n || weights.size() != n || extras.size() != n) {
    throw std::invalid_argument("[mlxtune stack_weights] one entry a layer in every list "
                                "(norms: two).");
  }
  auto stack = std::make_shared<StackWeights>();
  std::vector<mx::array> all;
  for (size_t i = 0; i < n; ++i) {
    check_weights(weights[i], 21, "stack_weights");
    stack->layers.push_back(
        {params[i], {norms[2 * i], norms[2 * i + 1]},
         std::vector<mx::array>(weights[i].begin(), weights[i].begin() + 9),
         std::vector<mx::array>(weights[i].begin() + 9, weights[i].end()), extras[i]});
    all.insert(all.end(), weights[i].begin(), weights[i].end());
    all.insert(all.end(), extras[i].begin(), extras[i].end());
  }
  all.insert(all.end(), norms.begin(), norms.end());
  mx::eval(all);  // decode_stack reads them as data, not as graph inputs
  return stack;
}

std::vector<mx::array> decode_stack(const mx::array& x,
                                    const std::shared_ptr<const StackWeights>& stack,
                                    const mx::array& offset, const std::vector<mx::array>& keys,
                                    const std::vector<mx::array>& values, int prev,
                                    const std::optional<mx::array>& mask, bool causal,
                                    const StackAdapters& adapters, mx::StreamOrDevice s) {
  const size_t n = stack->layers.size();
  for (size_t count : {keys.size(), values.size(), adapters.qkv.size(), adapters.out.size(),
                       adapters.qkv_masks.size(), adapters.out_masks.size(),
                       adapters.rows.size(), adapters.scales.size()}) {
    if (count != n) {
      throw std::invalid_argument("[mlxtune decode_stack] every list needs one entry a layer.");
    }
  }
  auto stream = mx::to_stream(s);
  // The probe: an input nothing but this op holds (only_this_op_holds).
  std::vector<mx::array> inputs = {x, mx::array(0), mx::astype(offset, mx::int32, stream),
                                   mask.value_or(x)};
  inputs.insert(inputs.end(), keys.begin(), keys.end());
  inputs.insert(inputs.end(), values.begin(), values.end());
  DecodeStack::Call call{stack, {}, {}, prev};
  const int L = x.shape(1);
  for (size_t i = 0; i < n; ++i) {
    const StackLayer& w = stack->layers[i];
    BlockParams p = block_call(w.params, causal, adapters.qkv_masks[i], adapters.out_masks[i],
                               adapters.rows[i] != 0, adapters.scales[i] != 0);
    p.out.has_mask = mask.has_value();
    p.out.kv_length = prev + L;  // attention reads the buffers' first prev + L positions
    check_qkv(x, w.norms[0], w.qkv, offset, w.extras, p.qkv, adapters.qkv[i], "decode_stack");
    check_buffers(x, p.qkv, keys[i], values[i], prev, "decode_stack");
    check_out(x, {x.shape(0), p.qkv.heads, L, p.qkv.head_dim}, keys[i], values[i], w.out,
              w.norms[1], mask, p.out, adapters.out[i], "decode_stack");
    for (const auto* lora : {&adapters.qkv[i], &adapters.out[i]}) {
      call.lora_at.push_back(static_cast<int>(inputs.size()));
      inputs.insert(inputs.end(), lora->begin(), lora->end());
    }
    call.params.push_back(p);
  }
  std::vector<mx::Shape> shapes = {x.shape()};
  for (const auto* buffers : {&keys, &values}) {
    for (const auto& b : *buffers) shapes.push_back(b.shape());
  }
  return mx::array::make_arrays(shapes, std::vector<mx::Dtype>(shapes.size(), mx::float32),
                                std::make_shared<DecodeStack>(stream, std::move(call)), inputs);
}

}  // namespace mlxtune
