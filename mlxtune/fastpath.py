"""The one place that picks how a model computes on this backend.

On Metal and CUDA, MLX's quantized kernels are the fast path and nothing changes. On the CPU
backend (the math is in cpu_math.py):
- MLX's `quantized_matmul` is ~15x slower than de-quantizing the weight and calling the BLAS
  matmul, and fp16/bf16 matmuls skip BLAS, so quantized layers keep their packed 4/8-bit weights
  and de-quantize to fp32 per layer inside a custom VJP that de-quantizes again in the backward
  pass: the fp32 copy of a weight lives only while its layer computes, instead of every layer's
  fp32 copy waiting for the backward pass (13.5 GB instead of ~4 for a 7B-shaped model);
- MLX's exp is scalar, so the SwiGLU MLPs and the attention softmax of the architectures in
  STANDARD use a vectorized one, and training computes the output projection and cross-entropy
  in one pass (`token_losses`); generation normalizes each step's logits with a vectorized
  logsumexp (`use_fast_logsumexp`).
"""

from __future__ import annotations

import importlib
import sys
import types
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxtune import kernels
from mlxtune.decode_block import fused_block_call, fused_stack_call
from mlxtune.cpu_math import (COMPUTE_DTYPE, attention, attention_kernel_covers, dequantize,
                              dequantized_matmul, linear_cross_entropy, logsumexp, packed_matmul,
                              swiglu)

# mlx-lm architectures whose Model.__call__ is `head(self.model(inputs))` (head: `lm_head`, or the
# embedding when tied), whose MLP class computes `down_proj(swiglu(gate_proj(x), up_proj(x)))`
# and whose attention calls the module's `scaled_dot_product_attention` (tests/test_fastpath.py
# checks each against stock mlx-lm). Mistral and SmolLM2 load as llama.
STANDARD = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")


def use_dequantized_matmul(backend: str) -> bool:
    """Whether quantized layers should de-quantize per layer (the CPU backend) or not."""
    return backend == "cpu"


class DequantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear (same packed weights, same isinstance for LoRA and fuse) that computes by
    de-quantizing to fp32 and calling the BLAS matmul."""

    def __call__(self, x):
        y = dequantized_matmul(x, self)
        return y + self["bias"] if "bias" in self else y

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> "DequantizedLinear":
        """The same layer, sharing its arrays, computing the de-quantized way."""
        return _rebase(cls, layer)


class DequantizedEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose lookups return fp32 and whose tied-head `as_linear` (for SmolLM2
    a 49152 x 576 matmul, the largest in the model) de-quantizes per call."""

    def __call__(self, x):
        biases = self.get("biases")
        rows = self["weight"][x]
        flat = dequantize(rows.reshape(-1, rows.shape[-1]),
                          self["scales"][x].reshape(rows.size // rows.shape[-1], -1),
                          biases[x].reshape(rows.size // rows.shape[-1], -1)
                          if biases is not None else None,
                          self.group_size, self.bits, self.mode)
        return flat.reshape(*x.shape, -1)

    def as_linear(self, x):
        """The tied output projection, de-quantized per call."""
        return dequantized_matmul(x, self)

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedEmbedding) -> "DequantizedEmbedding":
        """The same embedding, sharing its arrays, computing the de-quantized way."""
        return _rebase(cls, layer)


# Up to this many rows of x (tokens in a decode batch, or a short prompt), an inference matmul
# reads the packed weights; above it, de-quantizing and the BLAS matmul win. Measured on
# SmolLM2-135M's prefill, one thread (Xeon, AVX-512; 2 loaded cores, so roughly): 32 tokens
# 139-183 ms packed vs 169 de-quantized, 64 tokens 324-463 vs 270-292, 128: 1834 vs 635.
PACKED_ROWS = 32


def inference_matmul(x: mx.array, layer) -> mx.array:
    """`x @ W.T` for a quantized layer at inference, the way that is fastest for x's shape: a few
    rows read the packed weights (no gradient), more go through dequantized_matmul (the weight
    de-quantized per call, into kernels.dequant_matmul's blocks or whole for the BLAS)."""
    if x.size // x.shape[-1] <= PACKED_ROWS:
        return packed_matmul(x, layer)
    return dequantized_matmul(x, layer)


class InferenceLinear(DequantizedLinear):
    """A DequantizedLinear for generation: decoding reads the packed weights (inference only)."""

    def __call__(self, x):
        y = inference_matmul(x, self)
        return y + self["bias"] if "bias" in self else y


class InferenceEmbedding(DequantizedEmbedding):
    """A DequantizedEmbedding for generation: the tied head (SmolLM2: 49152 x 576, the largest
    matmul) reads the packed weights when decoding (inference only)."""

    def as_linear(self, x):
        """The tied output projection."""
        return inference_matmul(x, self)


class InferenceRMSNorm(nn.RMSNorm):
    """nn.RMSNorm as one op (mlxtune's kernel) for fp32 inference; MLX's fast.rms_norm, whose
    CPU fallback is ~6 ops, otherwise."""

    def __call__(self, x):
        if kernels.rms_norm is not None and x.dtype == self.weight.dtype == mx.float32:
            return kernels.rms_norm(x, self.weight, self.eps)
        return super().__call__(x)


class InferenceRoPE(nn.RoPE):
    """nn.RoPE as one op (mlxtune's kernel) for fp32 inference; MLX's fast.rope, whose CPU
    fallback is ~15 ops, otherwise."""

    def __call__(self, x, offset=0):
        if kernels.rope is not None and x.dtype == mx.float32 and x.ndim >= 3:
            if not isinstance(offset, mx.array):
                offset = mx.array(offset, mx.int32)
            return kernels.rope(x, self.dims, self.traditional, float(self.base), self.scale,
                                offset)
        return super().__call__(x, offset)


def _rebase(cls, layer: nn.Module) -> nn.Module:
    # Same arrays, same attributes (group_size, bits, mode, frozen keys): only the class changes,
    # so no weight is copied or re-quantized.
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    dict.update(new, layer)
    return new


_SWAPS = {nn.QuantizedLinear: DequantizedLinear, nn.QuantizedEmbedding: DequantizedEmbedding}
# Generation also swaps the norms and rotary embeddings, whose MLX CPU fallbacks cost a decode
# step of SmolLM2-135M ~10 ms in per-op overhead (25 -> 15 ms).
_INFERENCE_SWAPS = {nn.QuantizedLinear: InferenceLinear, nn.QuantizedEmbedding: InferenceEmbedding,
                    nn.RMSNorm: InferenceRMSNorm, nn.RoPE: InferenceRoPE}


def dequantize_per_layer(model: nn.Module, swaps: dict = _SWAPS) -> int:
    """Swap every quantized linear/embedding (also inside LoRA layers) for its de-quantizing twin
    (`swaps`: the training twins, or the inference ones, which swap norms and rotary embeddings
    too); returns how many were swapped."""
    table, swaps = swaps, []
    for path, module in model.named_modules():
        target = table.get(type(module))  # exact type: leaves subclasses (and ours) alone
        if target is not None:
            swaps.append((path, _rebase(target, module)))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def cast_floats(model: nn.Module, dtype=COMPUTE_DTYPE) -> None:
    """Cast float parameters (norms, float linears, LoRA) to `dtype`, leaving quantized layers'
    scales and biases as stored: they are up-cast per call and would otherwise double in size."""
    quantized = {path for path, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    updates = []
    for key, value in tree_flatten(model.parameters()):
        parent, _, name = key.rpartition(".")
        if parent in quantized and name in ("scales", "biases"):
            continue
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != dtype:
            updates.append((key, value.astype(dtype)))
    if updates:
        model.update(tree_unflatten(updates))


def _generation_swiglu(gate, up):
    """silu(gate) * up in one vectorized op when generating (no gradient), mlx-lm's otherwise."""
    if kernels.swiglu is not None and gate.dtype == up.dtype == mx.float32 \
            and gate.shape == up.shape:
        return kernels.swiglu(gate, up)
    from mlx_lm.models.activations import swiglu as stock

    return stock(gate, up)


@lru_cache(maxsize=None)
def _fast_mlp_class(cls: type, inference: bool = False) -> type:
    act = _generation_swiglu if inference else swiglu

    def __call__(self, x):
        return self.down_proj(act(self.gate_proj(x), self.up_proj(x)))

    kind = "the one-op SwiGLU (generation)" if inference else "the fast SwiGLU"
    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": __name__,
                                       "__doc__": f"{cls.__module__}.MLP with {kind}."})


@lru_cache(maxsize=None)
def _fused_block_class(cls: type) -> type:
    def __call__(self, x, mask=None, cache=None):
        out = fused_block_call(self, x, mask, cache, PACKED_ROWS)
        return cls.__call__(self, x, mask, cache) if out is None else out

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": __name__,
                                       "_mlxtune_fused": True,
                                       "__doc__": f"{cls.__module__}.TransformerBlock, decoding "
                                                  "through two fused ops when it can."})


@lru_cache(maxsize=None)
def _fused_stack_class(cls: type) -> type:
    def __call__(self, inputs, cache=None, input_embeddings=None, **kwargs):
        out = None if kwargs else fused_stack_call(self, inputs, cache, input_embeddings,
                                                   PACKED_ROWS)
        if out is None:
            return cls.__call__(self, inputs, cache, input_embeddings, **kwargs)
        return out

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": __name__,
                                       "__doc__": f"{cls.__module__}.{cls.__name__}, decoding "
                                                  "all its fused blocks in one call when it can."})


def _swap_classes(model: nn.Module, name: str, twin) -> int:
    """Rebase every module of a STANDARD architecture's class `name` onto twin(that class)."""
    module = sys.modules.get(type(model).__module__)
    cls = getattr(module, name, None) if type(model).__module__ in STANDARD else None
    swaps = [(path, _rebase(twin(cls), m))
             for path, m in model.named_modules() if cls is not None and type(m) is cls]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def use_fast_mlps(model: nn.Module, inference: bool = False) -> int:
    """Swap the MLPs of a STANDARD architecture for twins with the vectorized SwiGLU (training's
    custom-gradient one, or generation's single op); returns how many were swapped."""
    return _swap_classes(model, "MLP", lambda cls: _fast_mlp_class(cls, inference))


def use_fused_blocks(model: nn.Module) -> int:
    """Swap the decoder blocks of a STANDARD architecture for twins that decode through the two
    fused ops of decode_block.py (generation only: no gradient); returns how many were swapped."""
    if kernels.decode_qkv is None:
        return 0
    swapped = _swap_classes(model, "TransformerBlock", _fused_block_class)
    inner = getattr(model, "model", None)
    if swapped and type(inner).__module__ in STANDARD and "layers" in inner:
        model.update_modules({"model": _rebase(_fused_stack_class(type(inner)), inner)})
    return swapped


# Without the attention kernel, the fast-exp attention keeps its probabilities for the backward
# pass, as MLX's own does not: above this many scores (64 MB in fp32; SmolLM2 batch 1 x 1366
# tokens) mlx-lm's takes over, so long sequences keep MLX's memory (at 2048 tokens the fast one
# measured +0.26 GB). The kernel keeps none: it has no limit (mlx-lm's at 2048 tokens made a
# training step 2.5x slower than PEFT's, its exp a scalar libm call).
FAST_ATTENTION_SCORES = 1 << 24


def _cpu_sdpa(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's scaled_dot_product_attention, with mlxtune's one-op attention when decoding, the
    fast-exp attention for the cases it covers (fp32, no quantized cache, no sinks, a causal or
    2-D mask, not too long) and mlx-lm's own otherwise."""
    from mlx_lm.models.base import scaled_dot_product_attention as stock

    b, heads, n, _ = queries.shape
    plain = (not hasattr(cache, "bits") and sinks is None and queries.dtype == mx.float32
             and keys.dtype == mx.float32)
    # A KV cache means generation, which takes no gradient (the kernel has none); the kernel is
    # for a few queries (decoding, short prompts), as the packed matmul.
    if (plain and cache is not None and n <= PACKED_ROWS and kernels.attention is not None
            and (mask is None or isinstance(mask, str) or mask.dtype in (mx.bool_, mx.float32))):
        causal = isinstance(mask, str)
        return kernels.attention(queries, keys, values, scale, causal, None if causal else mask)
    # (A quantized cache's keys are tuples: `plain` is checked first.)
    if (not plain or not (mask is None or isinstance(mask, str) or mask.ndim <= 2)
            or (b * heads * n * keys.shape[2] > FAST_ATTENTION_SCORES
                and not attention_kernel_covers(queries, keys, values, mask))):
        return stock(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    return attention(queries, keys, values, scale, mask)


def use_fast_attention(model: nn.Module) -> bool:
    """Point a STANDARD architecture's module at the fast-exp attention. This is per module, not
    per model (mlx-lm's attention looks the function up there); only the CPU path calls it, and
    the results equal mlx-lm's to float rounding (tests/test_fastpath.py)."""
    name = type(model).__module__
    if name not in STANDARD:
        return False
    sys.modules[name].scaled_dot_product_attention = _cpu_sdpa
    return True


class _GenerationMx(types.ModuleType):
    """mlx.core as mlx_lm.generate sees it on the CPU path (use_fast_logsumexp): every name is
    mlx.core's except logsumexp, which over the last axis of fp32 logits is mlxtune's kernel.
    mlx-lm normalizes each decoding step's logits with it, and MLX's CPU loop for it is scalar:
    0.69 of a ~7 ms SmolLM2 step, on the critical path of every token."""

    def __init__(self, name: str):
        super().__init__(name)
        # mlx.core's names as this module's own: a lookup per `mx.` in mlx-lm's step loop stays
        # a dict hit (a miss that falls to __getattr__ costs ~1.4 us instead of ~30 ns).
        self.__dict__.update((k, v) for k, v in vars(mx).items()
                             if not k.startswith("__") and k != "logsumexp")

    def __getattr__(self, name):
        return getattr(mx, name)

    @staticmethod
    def logsumexp(a, axis=None, keepdims=False, **kwargs):
        """mx.logsumexp; the kernel for the calls mlx-lm makes (keepdims, over the last axis, or
        over all axes of a single row)."""
        if (isinstance(a, mx.array) and a.ndim > 0 and keepdims and not kwargs
                and (axis in (-1, a.ndim - 1) or (axis is None and a.size == a.shape[-1]))):
            return logsumexp(a)
        return mx.logsumexp(a, axis=axis, keepdims=keepdims, **kwargs)


def use_fast_logsumexp() -> bool:
    """Point mlx_lm.generate (generate_step, BatchGenerator: their `mx` global) at
    _GenerationMx, so each step's log-probabilities come from the vectorized logsumexp (equal
    to MLX's to float rounding; tests/test_fastpath.py); False when the kernels are not built.
    Only the CPU path calls this."""
    if kernels.logsumexp is None:
        return False
    # The module, not the function mlx_lm's package exports under the same name.
    generate = importlib.import_module("mlx_lm.generate")
    if not isinstance(generate.mx, _GenerationMx):
        generate.mx = _GenerationMx(__name__ + ".mx")
    return True


def standard_model_type(model_type: str) -> bool:
    """Whether a model of this config.json `model_type` is a STANDARD architecture: on the CPU
    path it trains with the fused output loss (its head quantized, as the CPU path's models are)
    and the attention kernel (where built)."""
    from mlx_lm.utils import MODEL_REMAPPING

    return f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}" in STANDARD


def _fused_head(model: nn.Module) -> nn.Module | None:
    """The frozen de-quantizing output head of a STANDARD model, or None (then logits are used)."""
    if type(model).__module__ not in STANDARD:
        return None
    args = getattr(model, "args", None)
    head = (model.model.embed_tokens if getattr(args, "tie_word_embeddings", False)
            else getattr(model, "lm_head", None))
    # Exact types: a LoRA-wrapped or trainable head needs its own gradient, so it takes logits.
    if type(head) in (DequantizedLinear, DequantizedEmbedding) and "bias" not in head:
        return head
    return None


def _output_head(model: nn.Module):
    """The output projection of a STANDARD model as a callable (the tied embedding or lm_head)."""
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False):
        return model.model.embed_tokens.as_linear
    return model.lm_head


def token_losses(model: nn.Module, inputs: mx.array, targets: mx.array,
                 rows: mx.array | None = None) -> mx.array:
    """Each position's cross-entropy of the next-token prediction against `targets` (fp32); with
    `rows` (positions in the flattened batch), only those positions', as a vector.

    Training on the CPU path fuses the output projection with the loss (no logits kept, one exp
    per logit); evaluation, other backends and other architectures go through the logits. With
    `rows`, a STANDARD model projects only those positions onto the vocabulary: the head, the
    largest matmul of a small model, skips the tokens that carry no loss (prompt, padding).
    `inputs` are token ids or, from train/frozen_prefix.py, the (batch, length, hidden) states
    entering the first layer the model still computes.
    """
    standard = type(model).__module__ in STANDARD
    # mlx-lm's models take hidden states as `input_embeddings`, in place of the token ids.
    x, extra = ((None, {"input_embeddings": inputs}) if mx.issubdtype(inputs.dtype, mx.floating)
                else (inputs, {}))
    if rows is not None and standard:
        h = model.model(x, **extra)
        h, targets = h.reshape(-1, h.shape[-1])[rows], targets.reshape(-1)[rows]
        head = _fused_head(model) if model.training else None
        if head is not None:
            return linear_cross_entropy(h, head, targets)
        return nn.losses.cross_entropy(_output_head(model)(h).astype(mx.float32), targets)
    head = _fused_head(model) if model.training else None
    if head is not None:
        losses = linear_cross_entropy(model.model(x, **extra), head, targets)
    else:
        losses = nn.losses.cross_entropy(model(x, **extra).astype(mx.float32), targets)
    return losses if rows is None else losses.reshape(-1)[rows]


def prepare_for_training(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Set `model` up for this backend's fast path (CPU: de-quantize per layer, fp32, fast
    SwiGLU and attention); in place."""
    return _prepare(model, backend, _SWAPS)


def prepare_for_inference(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Set `model` up for generation on this backend, in eval mode, in place (serve, eval, fuse's
    drift check). CPU: as training, but quantized weights stay packed for decoding (the compiled
    kernel, no gradient) and are de-quantized per layer for prefill: the model keeps its 4-bit
    size instead of growing 6x to fp32. Metal/CUDA: unchanged."""
    model.eval()
    return _prepare(model, backend, _INFERENCE_SWAPS)


def _prepare(model: nn.Module, backend: str | None, swaps: dict) -> nn.Module:
    if backend is None:
        from mlxtune.platform import backend as current_backend

        backend = current_backend()
    if use_dequantized_matmul(backend):
        dequantize_per_layer(model, swaps)
        cast_floats(model)
        # Training's SwiGLU has a custom gradient (~7 ops); generation's is one op.
        use_fast_mlps(model, inference=swaps is not _SWAPS)
        use_fast_attention(model)
        if swaps is not _SWAPS:  # decoding: the fused blocks and log-probabilities (no gradient)
            use_fused_blocks(model)
            use_fast_logsumexp()
    return model
