// Attention for training and prefill on the CPU: softmax(q k^T * scale [causal]) v as one op
// that also returns each row's log-sum-exp, and its gradient as another op that recomputes the
// probabilities from it (as FlashAttention does): nothing of size L x S is kept between the two.
//
// MLX's CPU attention is a batched matmul per (batch, head) of small products plus a softmax of
// scalar ops: SmolLM2's 9 heads at 1 x 1024 tokens ran at ~20 GFLOP/s, and attention was most of
// a training step at 1024 tokens (PEFT, with PyTorch's flash attention, 1.45x ahead). Here each
// query block of a head is one task: its scores against the keys it may see (causal: none past
// its last row's), an exact softmax per row, times v, with register-tiled products compiled for
// AVX-512, AVX2 and the x86-64 baseline (the instruction set quantized_matmul uses, see
// set_matmul_isa). The gradient is one task per head, so each head's key/value gradients are its
// own; cpu_math sums them over the heads that share a key/value head.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#include "kernels.h"
#include "pool.h"
#include "vec_math.h"

namespace mlxtune {
namespace {

// Queries a task takes at once: their scores against up to all keys fit in L2 (64 x 2048 floats).
constexpr int64_t QBLOCK = 64;

// Row-major (B, H, L, D) queries and outputs, (B, KVH, S, D) keys and values, (B, H, L) log-sum-
// exps; the backward's gradients: dq as q, dk and dv per query head (B, H, S, D).
struct AttnArgs {
  const float *q, *k, *v;
  float *out, *lse_out;  // forward only: the output and each row's log-sum-exp
  int64_t B, H, KVH, L, S, D;
  float scale;
  bool causal;
  // backward only: the forward's output and log-sum-exp, and the output's gradient
  const float *o, *lse, *dout;
  float *dq, *dk, *dv;
};

#define ISA_BODY "attention_isa.inc"
#include "isa_namespaces.inc"
#undef ISA_BODY

void run_forward(const AttnArgs& a) {
  const std::string isa = matmul_isa();
  if (isa == "avx512") return avx512::forward(a);
  if (isa == "avx2") return avx2::forward(a);
  baseline::forward(a);
}

void run_backward(const AttnArgs& a) {
  const std::string isa = matmul_isa();
  if (isa == "avx512") return avx512::backward(a);
  if (isa == "avx2") return avx2::backward(a);
  baseline::backward(a);
}

// What both ops share: their settings, equality by them, and the inputs' shapes and q, k, v.
class AttentionOp : public InferenceOnly {
 public:
  AttentionOp(mx::Stream stream, float scale, bool causal)
      : InferenceOnly(stream), scale_(scale), causal_(causal) {}

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const AttentionOp&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

 protected:
  AttnArgs args(const std::vector<mx::array>& inputs) const {
    const auto &q = inputs[0], &k = inputs[1];
    AttnArgs a{};
    a.B = q.shape(0), a.H = q.shape(1), a.L = q.shape(2), a.D = q.shape(3);
    a.KVH = k.shape(1), a.S = k.shape(2);
    a.scale = scale_, a.causal = causal_;
    a.q = q.data<float>(), a.k = k.data<float>(), a.v = inputs[2].data<float>();
    return a;
  }

 private:
  float scale_;
  bool causal_;
};

// Gradients exist as the backward op (attention_train_grad); this op's own vjp is never asked
// for: cpu_math wraps the pair in a custom function.
class AttentionTrain : public AttentionOp {
 public:
  using AttentionOp::AttentionOp;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = encoder_for(inputs, outputs);
    AttnArgs a = args(inputs);
    a.out = outputs[0].data<float>(), a.lse_out = outputs[1].data<float>();
    encoder.dispatch([a]() { run_forward(a); });
  }

  const char* name() const override {
    return "MlxtuneAttentionTrain";
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const auto& q = inputs[0];
    return {q.shape(), {q.shape(0), q.shape(1), q.shape(2)}};
  }
};

class AttentionTrainGrad : public AttentionOp {
 public:
  using AttentionOp::AttentionOp;

  // inputs: q, k, v, o, lse, dout; outputs: dq, and dk, dv per query head.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = encoder_for(inputs, outputs);
    AttnArgs a = args(inputs);
    a.o = inputs[3].data<float>(), a.lse = inputs[4].data<float>();
    a.dout = inputs[5].data<float>();
    a.dq = outputs[0].data<float>(), a.dk = outputs[1].data<float>();
    a.dv = outputs[2].data<float>();
    encoder.dispatch([a]() { run_backward(a); });
  }

  const char* name() const override {
    return "MlxtuneAttentionTrainGrad";
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const auto& q = inputs[0];
    const mx::Shape per_head = {q.shape(0), q.shape(1), inputs[1].shape(2), q.shape(3)};
    return {q.shape(), per_head, per_head};
  }
};

void check(const mx::array& q, const mx::array& k, const mx::array& v, const char* op) {
  for (const auto* x : {&q, &k, &v}) {
    if (x->dtype() != mx::float32 || x->ndim() != 4) {
      throw std::invalid_argument(std::string("[mlxtune ") + op +
                                  "] expects float32 (B, heads, L, D) arrays.");
    }
  }
  if (k.shape() != v.shape() || q.shape(0) != k.shape(0) || q.shape(3) != k.shape(3) ||
      q.shape(1) % k.shape(1) != 0 || k.shape(2) < q.shape(2)) {
    throw std::invalid_argument(std::string("[mlxtune ") + op +
                                "] q (B, H, L, D) and k, v (B, KVH, S, D) with H a multiple "
                                "of KVH and S >= L.");
  }
}

}  // namespace

std::vector<mx::array> attention_train(const mx::array& q, const mx::array& k,
                                       const mx::array& v, float scale, bool causal,
                                       mx::StreamOrDevice s) {
  check(q, k, v, "attention_train");
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs;
  for (const auto* x : {&q, &k, &v}) inputs.push_back(mx::contiguous(*x, false, stream));
  auto prim = std::make_shared<AttentionTrain>(stream, scale, causal);
  return mx::array::make_arrays(prim->output_shapes(inputs), {mx::float32, mx::float32}, prim,
                                inputs);
}

std::vector<mx::array> attention_train_grad(const mx::array& q, const mx::array& k,
                                            const mx::array& v, const mx::array& o,
                                            const mx::array& lse, const mx::array& dout,
                                            float scale, bool causal, mx::StreamOrDevice s) {
  check(q, k, v, "attention_train_grad");
  if (o.shape() != q.shape() || dout.shape() != q.shape() || o.dtype() != mx::float32 ||
      dout.dtype() != mx::float32 || lse.dtype() != mx::float32 ||
      lse.shape() != mx::Shape{q.shape(0), q.shape(1), q.shape(2)}) {
    throw std::invalid_argument("[mlxtune attention_train_grad] o and dout shaped as q, lse as "
                                "q without its last axis, all float32.");
  }
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs;
  for (const auto* x : {&q, &k, &v, &o, &lse, &dout}) {
    inputs.push_back(mx::contiguous(*x, false, stream));
  }
  auto prim = std::make_shared<AttentionTrainGrad>(stream, scale, causal);
  return mx::array::make_arrays(prim->output_shapes(inputs),
                                {mx::float32, mx::float32, mx::float32}, prim, inputs);
}

}  // namespace mlxtune
