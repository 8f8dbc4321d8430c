"""The math of the CPU fast path: de-quantized matmuls, and exp-heavy ops rewritten for MLX's CPU.

De-quantizing: MLX's CPU `quantized_matmul` is ~15x slower than de-quantizing to fp32 and
calling the BLAS matmul, so `dequantized_matmul` does that inside a custom VJP that de-quantizes
again in the backward pass (the fp32 copy of a weight lives only while its layer computes), in
row chunks for big weights, each chunk ordered after the previous one. Decoding (a few rows of x)
is the exception: there de-quantizing costs more than the matmul, and `packed_matmul` reads the
packed weights instead. With mlxtune's compiled kernels (mlxtune/kernels) built, training's
matmuls skip the fp32 copy too: `kernels.dequant_matmul` de-quantizes each panel of the weight
into the block its register tiles read (_kernel_matmul: the projections, their input gradients
and the fused loss's head). The de-quantizing, the packed matmul and the fused loss's exp/max/sum
run in the kernels as well, and in MLX's ops (same numbers, slower) without them.

Exp: MLX's CPU `exp` costs ~15 ns an element (scalar, a libm call per fma), so on 2 cores the softmax
over SmolLM2's 49152-word vocabulary (12.6M exps for 256 tokens, twice: forward and backward) and
the SiLU of every MLP cost more than their matmuls. Here exp is a Cephes-style polynomial made of
ops that `mx.compile` fuses into one loop g++ vectorizes (~4x faster, relative error < 1e-6),
and its users get custom gradients that reuse work instead of recomputing it:

- `swiglu(gate, up)`: silu(gate) * up, its backward from one more fast exp.
- `softmax` / `attention`: the backward from the kept probabilities.
- `linear_cross_entropy(h, head, targets)`: the output projection and the cross-entropy in one
  pass over the vocabulary, in row chunks with a running max (like flash attention): the softmax
  is exponentiated once and the gradient for h is formed in the same pass, so the full logits are
  never kept and the head is de-quantized once per step instead of twice (per product with the
  kernels: into register-tile blocks, never whole).

fastpath.py decides where these are used (the CPU backend only).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from mlxtune import kernels

COMPUTE_DTYPE = mx.float32


def dequantize(w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
               bits: int, mode: str = "affine", dtype=COMPUTE_DTYPE) -> mx.array:
    """De-quantize packed weights (rows x packed columns) to `dtype`, computing in `dtype`."""
    if (kernels.dequantize is not None and dtype == mx.float32 and mode == "affine"
            and bits in (4, 8) and biases is not None and w.dtype == mx.uint32 and w.ndim == 2):
        return kernels.dequantize(w, scales, biases, group_size, bits)
    # mx.dequantize computes in the scales' dtype: fp16 scales lose ~3e-3 even when asked for fp32.
    scales = scales.astype(dtype)
    biases = biases.astype(dtype) if biases is not None else None
    if mode != "affine" or bits not in (4, 8) or biases is None or w.dtype != mx.uint32:
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)
    # For 4/8-bit affine these plain ops give the same numbers 2-3x faster on CPU than
    # mx.dequantize, as one broadcast expression (no stacked copy: de-quantizing allocates little
    # more than the fp32 result). MLX compiles it to a strided loop whose innermost axis should be
    # long: 8-bit reads bytes, (rows, groups, bytes per group, 1); 4-bit shifts each 32-bit word
    # by 0, 4, .. 28, (rows, groups, words per group, 8). Measured on a 1536 x 576 4-bit weight:
    # 1.4 ms, against 1.9 with bytes and two nibbles per byte; 8-bit bytes: 49152 x 576 in 20 ms.
    rows = w.shape[0]
    if bits == 8:
        u = w.view(mx.uint8).reshape(rows, -1, group_size, 1)
    else:
        u = w.reshape(rows, -1, group_size // 8, 1)
        u = (u >> mx.array(list(range(0, 32, 4)), mx.uint32)) & mx.array(15, mx.uint32)
    q = u.astype(dtype) * scales[..., None, None] + biases[..., None, None]
    return q.reshape(rows, -1)


# At most this many weight elements are de-quantized at once (64 MB in fp32): bigger weights
# (the MLP's, the 32000-row lm_head at 0.5 GB) compute in row chunks, one fp32 chunk alive at a time.
CHUNK_ELEMENTS = 1 << 24


def row_chunks(rows: int, cols: int, tokens: int) -> list[tuple[int, int]]:
    """The row ranges a rows x cols weight is de-quantized in, for `tokens` input rows."""
    # Chunking costs a copy of the output (the chunks are concatenated): worth it only when the
    # fp32 weight it saves is bigger (7B's lm_head, not SmolLM2's 49152 x 576 tied head).
    if rows * cols - CHUNK_ELEMENTS <= tokens * rows:
        return [(0, rows)]
    return _split(rows, -(-rows * cols // CHUNK_ELEMENTS))


def _split(rows: int, parts: int) -> list[tuple[int, int]]:
    """0..rows in `parts` ranges of equal size (the last one shorter)."""
    step = -(-rows // parts)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def dequantized_rows(w, scales, biases, rows: tuple[int, int], spec: tuple, dtype,
                     after: mx.array) -> mx.array:
    """Rows a:b of a packed weight de-quantized to `dtype`, only once `after` exists.

    Without the dependency MLX's scheduler may de-quantize chunks and layers ahead of the
    matmuls that use them, and mx.compile merges a backward de-quantization with the forward's
    identical one, keeping every fp32 weight alive until the backward pass.
    """
    group_size, bits, mode, has_biases = spec
    a, b = rows
    parts = mx.depends([w[a:b], scales[a:b]] + ([biases[a:b]] if has_biases else []), after)
    return dequantize(parts[0], parts[1], parts[2] if has_biases else None, group_size, bits,
                      mode, dtype)


# The kernel reads x's rows, up to KERNEL_X_DEPTH of the summed terms at a time, once per panel
# of 8-32 output columns: while that part fits in 16 MB the caches serve it (SmolLM2 at 1 x 2048
# tokens, or a 7B at 1 x 2048: 16 MB), past that the BLAS computes.
KERNEL_X_ELEMENTS = 1 << 22
KERNEL_X_DEPTH = 2048


def kernel_matmul_fits(rows: int, inner: int) -> bool:
    """Whether kernels.dequant_matmul is built and takes `rows` rows summed over `inner` terms
    (the part of x it reads at a time fits the caches); memory.py plans by the same rule."""
    return (kernels.dequant_matmul is not None
            and rows * min(inner, KERNEL_X_DEPTH) <= KERNEL_X_ELEMENTS)


def _kernel_covers(rows: int, inner: int, dtype, spec: tuple) -> bool:
    """Whether kernels.dequant_matmul computes `rows` rows summed over `inner` terms: it fits
    (kernel_matmul_fits), fp32 on the CPU, 4/8-bit affine with biases, groups a multiple of 32."""
    group_size, bits, mode, has_biases = spec
    return (kernel_matmul_fits(rows, inner) and dtype == mx.float32 and has_biases
            and mode == "affine" and bits in (4, 8) and group_size % 32 == 0
            and mx.default_device() == mx.cpu)


def _kernel_matmul(x: mx.array, w, scales, biases, spec: tuple, transpose: bool) -> mx.array | None:
    """x @ W.T (transpose) or x @ W by kernels.dequant_matmul, W never de-quantized whole; None
    where it does not apply (_kernel_covers)."""
    if not _kernel_covers(x.size // x.shape[-1], x.shape[-1], x.dtype, spec):
        return None
    return kernels.dequant_matmul(x, w, scales, biases, spec[0], spec[1], transpose)


@lru_cache(maxsize=None)
def _matmul_fn(group_size: int, bits: int, mode: str, has_biases: bool):
    """`x @ dequantize(w).T` whose gradient w.r.t. x de-quantizes again instead of keeping w:
    with the kernels, into register-tile blocks (_kernel_matmul), else whole or in row chunks
    for the BLAS."""
    spec = (group_size, bits, mode, has_biases)

    def chunks(w, scales, x):
        return row_chunks(w.shape[0], scales.shape[-1] * group_size, x.size // x.shape[-1])

    @mx.custom_function
    def matmul(x, w, scales, biases):
        fast = _kernel_matmul(x, w, scales, biases, spec, transpose=True)
        if fast is not None:
            return fast
        outs, after = [], x
        for rows in chunks(w, scales, x):
            after = x @ dequantized_rows(w, scales, biases, rows, spec, x.dtype, after).T
            outs.append(after)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        # Base weights are frozen: only the input gets a real gradient; the zeros stay lazy.
        dx = _kernel_matmul(cotangent, w, scales, biases, spec, transpose=False)
        if dx is None:
            for a, b in chunks(w, scales, cotangent):
                chunk = dequantized_rows(w, scales, biases, (a, b), spec, cotangent.dtype,
                                         cotangent if dx is None else dx)
                part = cotangent[..., a:b] @ chunk
                dx = part if dx is None else dx + part
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


def dequantized_matmul(x: mx.array, layer) -> mx.array:
    """`x @ W.T` for a quantized layer's W, computed in x's dtype and de-quantized per call."""
    biases = layer.get("biases")
    fn = _matmul_fn(layer.group_size, layer.bits, layer.mode, biases is not None)
    # custom_function takes arrays only: stand in a scalar for a missing biases array.
    return fn(x, layer["weight"], layer["scales"], biases if biases is not None else mx.array(0))


def packed_matmul(x: mx.array, layer) -> mx.array:
    """`x @ W.T` for a quantized layer's W read in its packed form, for decoding (a few rows of
    x): mlxtune's compiled kernel for fp32 x and 4/8-bit affine weights (no gradient), MLX's
    `quantized_matmul` otherwise."""
    biases = layer.get("biases")
    if (kernels.quantized_matmul is not None and x.dtype == mx.float32 and biases is not None
            and layer.mode == "affine" and layer.bits in (4, 8)
            and layer.group_size in (32, 64, 128)):
        return kernels.quantized_matmul(x, layer["weight"], layer["scales"], biases,
                                        layer.group_size, layer.bits)
    return mx.quantized_matmul(x, layer["weight"], layer["scales"].astype(x.dtype),
                               biases.astype(x.dtype) if biases is not None else None,
                               transpose=True, group_size=layer.group_size, bits=layer.bits,
                               mode=layer.mode)


_LOG2E = 1.4426950408889634
# ln 2 split in two (Cephes): n * _LN2_HI is exact in fp32 for |n| < 2^9.
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
# Cephes expf's minimax polynomial for (e^r - 1 - r) / r^2 on |r| <= ln(2)/2.
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)


@mx.compile
def exp(x: mx.array) -> mx.array:
    """e^x for fp32 `x` (clipped to [-87, 88], so it never overflows or goes subnormal)."""
    x = mx.clip(x, -87.0, 88.0)
    # Round to the nearest integer by adding and removing 1.5 * 2^23 (floor is a scalar loop in
    # MLX's generated CPU code; this is two vector adds): exp 1.6x faster.
    n = (x * _LOG2E + 12582912.0) - 12582912.0
    r = x - n * _LN2_HI - n * _LN2_LO
    p = _EXP_POLY[0]
    for c in _EXP_POLY[1:]:
        p = p * r + c
    y = p * r * r + r + 1.0
    # 2^n built from its bits: exponent field n + 127.
    return y * ((n.astype(mx.int32) + 127) << 23).view(mx.float32)


@mx.compile
def sigmoid(x: mx.array) -> mx.array:
    """1 / (1 + e^-x) with the fast exp."""
    return 1.0 / (1.0 + exp(-x))


@mx.compile
def _swiglu_grads(gate, up, cotangent):
    s = sigmoid(gate)
    return cotangent * up * s * (1.0 + gate * (1.0 - s)), cotangent * gate * s


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, as mlx-lm's MLPs compute it, with the fast exp both ways."""
    return gate * sigmoid(gate) * up


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    return _swiglu_grads(*primals, cotangent)


@mx.compile
def _shifted_exp(logits, shift):
    return exp(logits - shift)


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis with the fast exp; its gradient reuses the output."""
    e = _shifted_exp(x, mx.stop_gradient(x.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


@lru_cache(maxsize=None)
def _attention_kernel_fn(scale: float, causal: bool):
    """mlxtune's attention kernel and its gradient kernel as one differentiable function of
    (q, k, v), returning (output, each row's log-sum-exp): the backward recomputes the
    probabilities from the latter instead of keeping them."""

    @mx.custom_function
    def attend(q, k, v):
        return tuple(kernels.attention_train(q, k, v, scale, causal))

    @attend.vjp
    def attend_vjp(primals, cotangents, outputs):
        q, k, v = primals
        dq, dk, dv = kernels.attention_train_grad(q, k, v, outputs[0], outputs[1], cotangents[0],
                                                  scale, causal)
        b, kv_heads, s, d = k.shape
        group = q.shape[1] // kv_heads
        if group > 1:  # the kernel's key/value gradients are per query head
            dk = dk.reshape(b, kv_heads, group, s, d).sum(axis=2)
            dv = dv.reshape(b, kv_heads, group, s, d).sum(axis=2)
        return dq, dk, dv

    return attend


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """softmax(q k^T * scale + mask) v for (batch, heads, length, dim) arrays, grouped-query
    heads sharing their K/V without copies; `mask` None, "causal" (aligned to the last key, as
    MLX's) or a boolean/additive (queries x keys) array.

    fp32 without a mask array, on the CPU device: mlxtune's kernel (block-tiled products and
    an exact softmax per row, nothing of size queries x keys kept for the backward; forward +
    backward 2-7x faster than the ops below at 64-2048 tokens, scripts/bench_attention.py).
    Otherwise MLX's matmuls and the fast-exp softmax."""
    if attention_kernel_covers(q, k, v, mask):
        return _attention_kernel_fn(float(scale), isinstance(mask, str))(q, k, v)[0]
    return attention_ops(q, k, v, scale, mask)


def attention_kernel_covers(q: mx.array, k: mx.array, v: mx.array, mask=None) -> bool:
    """Whether attention() runs mlxtune's kernel for these (then nothing of size queries x keys
    is kept, however long the sequence): built, fp32, no mask array, at least as many keys as
    queries, on the CPU device."""
    return (kernels.attention_train is not None
            and (mask is None or (isinstance(mask, str) and mask == "causal"))
            and k.shape[2] >= q.shape[2] and q.dtype == k.dtype == v.dtype == mx.float32
            and mx.default_device() == mx.cpu)


def attention_ops(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """attention() in MLX's matmuls and the fast-exp softmax (its gradient keeps the
    probabilities): the path without the kernel, for any mask and dtype."""
    b, heads, n, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scores = ((q * scale).reshape(b, kv_heads, group * n, d) @ k.swapaxes(-1, -2))
    scores = scores.reshape(b, kv_heads, group, n, s)
    if isinstance(mask, str):
        mask = mx.arange(s)[None] <= mx.arange(n)[:, None] + (s - n)
    if mask is not None and mask.dtype == mx.bool_:
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    probs = softmax(scores).reshape(b, kv_heads, group * n, s)
    return (probs @ v).reshape(b, heads, n, d)


# At most this many logits (32 MB in fp32) exist at once in linear_cross_entropy: at 2048 tokens
# SmolLM2's 49152-word head would otherwise hold 2 x 400 MB (logits and their exp).
LOGIT_ELEMENTS = 1 << 23


def _softmax_parts(logits: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(exp(logits - max), max, sum of the former) over the last axis: one compiled two-thread
    pass when mlxtune's kernels are built (42 -> 7 ms for 256 x 24576), MLX's ops otherwise."""
    if kernels.softmax_parts is not None and logits.dtype == mx.float32:
        return tuple(kernels.softmax_parts(logits))
    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    e = _shifted_exp(logits, top)
    return e, top, e.sum(axis=-1, keepdims=True)


def logsumexp(x: mx.array) -> mx.array:
    """log(sum(exp(x))) over the last axis, kept as size 1 (generation's log-probabilities, no
    gradient): on the CPU device one vectorized pass in mlxtune's kernel for fp32 (0.69 -> 0.06
    ms for SmolLM2's 49152 logits), MLX's logsumexp otherwise."""
    if (kernels.logsumexp is not None and x.dtype == mx.float32 and x.size > 0
            and mx.default_device() == mx.cpu):
        return kernels.logsumexp(x)
    return mx.logsumexp(x, axis=-1, keepdims=True)


def logit_chunks(rows: int, cols: int, tokens: int) -> list[tuple[int, int]]:
    """The vocabulary ranges linear_cross_entropy works through, one at a time, for `tokens`
    positions: row_chunks' for the weight, split further so a chunk's logits stay small."""
    return _split(rows, max(len(row_chunks(rows, cols, tokens)), -(-rows * tokens // LOGIT_ELEMENTS)))


@lru_cache(maxsize=None)
def _linear_ce_fn(group_size: int, bits: int, mode: str, has_biases: bool):
    spec = (group_size, bits, mode, has_biases)

    @mx.custom_function
    def ce(h, targets, w, scales, biases):
        d = h.shape[-1]
        x = h.reshape(-1, d)
        n = x.shape[0]
        m = total = acc = None
        for rows in logit_chunks(w.shape[0], d, n):
            a, b = rows
            # This chunk's exp(logits - its row max), the max and the sum, and exp(...) @ W.
            if _kernel_covers(n, d, x.dtype, spec) and _kernel_covers(n, b - a, x.dtype, spec):
                # After the previous chunk, as dequantized_rows orders the BLAS route's.
                xs = x if acc is None else mx.depends([x], acc)[0]
                part_w = (w[a:b], scales[a:b], biases[a:b], group_size, bits)
                e, top, part = _softmax_parts(kernels.dequant_matmul(xs, *part_w, True))
                e_w = kernels.dequant_matmul(e, *part_w, False)
            else:  # the BLAS, on this part of the head de-quantized whole
                chunk = dequantized_rows(w, scales, biases, rows, spec, x.dtype,
                                         x if acc is None else acc)
                e, top, part = _softmax_parts(x @ chunk.T)
                e_w = e @ chunk
            if m is None:
                m, total, acc = top, part, e_w
            else:
                # Bring both to the higher max: the earlier chunks' sums, or this one's, shrink.
                new = mx.maximum(m, top)
                old_scale, scale = exp(m - new), exp(top - new)
                total = total * old_scale + part * scale
                acc = acc * old_scale + e_w * scale
                m = new
        t = targets.reshape(-1)
        wanted = dequantize(w[t], scales[t], biases[t] if has_biases else None, group_size, bits,
                            mode, x.dtype)
        loss = (m + mx.log(total))[:, 0] - (x * wanted).sum(axis=-1)
        # d loss / d h per token: softmax @ W - W[target].
        grad = acc / total - wanted
        return loss.reshape(targets.shape), grad.reshape(h.shape)

    @ce.vjp
    def ce_vjp(primals, cotangents, outputs):
        h, targets, w, scales, biases = primals
        # Only h gets a gradient: the head is frozen, targets are integers.
        return (cotangents[0][..., None] * outputs[1], mx.zeros_like(targets), mx.zeros_like(w),
                mx.zeros_like(scales), mx.zeros_like(biases))

    return ce


def linear_cross_entropy(h: mx.array, head, targets: mx.array) -> mx.array:
    """Per-token cross-entropy of `head(h)` against `targets`, for a frozen quantized head (a
    QuantizedLinear or a tied QuantizedEmbedding), without keeping the logits."""
    biases = head.get("biases")
    fn = _linear_ce_fn(head.group_size, head.bits, head.mode, biases is not None)
    return fn(h, targets, head["weight"], head["scales"],
              biases if biases is not None else mx.array(0))[0]
