"""mlxtune's compiled CPU kernels (mlxtune/kernels): built by setup on Linux, and exactly MLX's
numbers wherever cpu_math uses them."""

import os
import sys

import mlx.core as mx
import pytest

from mlxtune import cpu_math, kernels
from mlxtune.blas import switched_off

# Compiled kernels against MLX's ops: rerun per compute variant (test.sh --variants).
pytestmark = pytest.mark.numerics


def _mlx_ops(monkeypatch):
    """cpu_math without the compiled kernel: its MLX-op de-quantizer."""
    monkeypatch.setattr(kernels, "dequantize", None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="setup builds them on Linux")
def test_built_and_loaded_on_linux():
    if switched_off(kernels.OFF_VAR):  # the kernels-off variant of test.sh --variants
        assert kernels.dequantize is None and kernels.softmax_parts is None
        assert kernels.status() == "turned off (MLXTUNE_CPU_KERNELS=0)"
        return
    assert kernels.dequantize is not None, kernels.status()
    assert kernels.status().startswith("in use")


needs_kernels = pytest.mark.skipif(kernels.dequantize is None, reason=kernels.status())


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_dequantize_equals_mlx(bits, group_size, dtype, monkeypatch):
    w, scales, biases = mx.quantize(mx.random.normal((96, 512), key=mx.random.key(bits)),
                                    group_size=group_size, bits=bits)
    scales, biases = scales.astype(dtype), biases.astype(dtype)
    got = kernels.dequantize(w, scales, biases, group_size, bits)
    want = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32),
                         group_size=group_size, bits=bits)
    assert got.dtype == mx.float32 and got.shape == (96, 512)
    assert mx.array_equal(got, want).item()
    # cpu_math takes the kernel, and its own ops give the same numbers.
    assert mx.array_equal(cpu_math.dequantize(w, scales, biases, group_size, bits), got).item()
    _mlx_ops(monkeypatch)
    assert mx.array_equal(cpu_math.dequantize(w, scales, biases, group_size, bits), got).item()


@needs_kernels
def test_views_compile_and_many_threads():
    # Row slices (what dequantized_rows passes), a non-contiguous view, inside mx.compile, and a
    # weight big enough to be split over threads.
    w, scales, biases = mx.quantize(mx.random.normal((2048, 256), key=mx.random.key(1)),
                                    group_size=64, bits=4)
    want = mx.dequantize(w, scales, biases, group_size=64, bits=4)
    part = kernels.dequantize(w[100:300], scales[100:300], biases[100:300], 64, 4)
    assert mx.array_equal(part, want[100:300]).item()
    every_other = kernels.dequantize(w[::2], scales[::2], biases[::2], 64, 4)
    assert mx.array_equal(every_other, want[::2]).item()
    doubled = mx.compile(lambda w, s, b: 2 * kernels.dequantize(w, s, b, 64, 4))(w, scales, biases)
    assert mx.array_equal(doubled, 2 * want).item()


@needs_kernels
def test_rejects_what_it_does_not_cover():
    w, scales, biases = mx.quantize(mx.random.normal((8, 64)), group_size=32, bits=4)
    with pytest.raises(ValueError, match="bits"):
        kernels.dequantize(w, scales, biases, 32, 3)
    with pytest.raises(ValueError, match="expects"):
        kernels.dequantize(w, scales[:, :1], biases[:, :1], 32, 4)


@needs_kernels
def test_training_gradients_equal_with_and_without_kernel(monkeypatch):
    # The custom-VJP matmul de-quantizes in both passes: the kernel must not change a thing.
    w, scales, biases = mx.quantize(mx.random.normal((192, 128), key=mx.random.key(2)),
                                    group_size=32, bits=4)
    scales, biases = scales.astype(mx.float16), biases.astype(mx.float16)
    x = mx.random.normal((4, 8, 128), key=mx.random.key(3))
    fn = cpu_math._matmul_fn(32, 4, "affine", True)

    def loss(x):
        return (fn(x, w, scales, biases) ** 2).sum()

    with_kernel = mx.value_and_grad(loss)(x)
    _mlx_ops(monkeypatch)
    without = mx.value_and_grad(loss)(x)
    assert mx.allclose(with_kernel[0], without[0], rtol=1e-6).item()
    assert mx.array_equal(with_kernel[1], without[1]).item()


@needs_kernels
@pytest.mark.parametrize("shape", [(256, 3000), (3, 5, 13), (4, 8)])
def test_softmax_parts_equal_exp_max_sum(shape):
    # Widths that are and are not multiples of the 8-lane vector; rows split over threads.
    x = mx.random.normal(shape, key=mx.random.key(4)) * 8
    e, top, total = kernels.softmax_parts(x)
    want_top = x.max(axis=-1, keepdims=True)
    want_e = mx.exp(x - want_top)
    assert mx.array_equal(top, want_top).item()
    assert mx.allclose(e, want_e, rtol=1e-5, atol=0).item()
    assert mx.allclose(total, want_e.sum(axis=-1, keepdims=True), rtol=1e-5).item()
    assert e.shape == x.shape and top.shape == total.shape == (*shape[:-1], 1)
    # Far below the max it underflows to e^-87, never to garbage.
    far = kernels.softmax_parts(mx.array([[0.0, -1000.0]]))[0]
    assert 0 <= far[0, 1].item() < 1e-37 and far[0, 0].item() == 1.0


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 49152), (3, 5, 13), (4, 8), (2, 1)])
def test_logsumexp_equals_mlx(shape):
    x = mx.random.normal(shape, key=mx.random.key(5)) * 8
    got = kernels.logsumexp(x)
    assert got.shape == (*shape[:-1], 1)
    assert mx.allclose(got, mx.logsumexp(x, axis=-1, keepdims=True), rtol=2e-6, atol=0).item()
    assert mx.allclose(cpu_math.logsumexp(x), got).item()
    # Masked logits (-inf, as constrained decoding sets them), rows that are all masked or hold
    # an infinity: MLX's answers, never NaN.
    inf = float("inf")
    edge = mx.array([[0.5, -inf, 2.0, -inf] * 3, [-inf] * 12, [1.0] * 11 + [inf],
                     [-1000.0] + [0.0] * 11])
    assert mx.allclose(kernels.logsumexp(edge), mx.logsumexp(edge, axis=-1, keepdims=True),
                       rtol=1e-6, atol=0).item()
    with pytest.raises(RuntimeError, match="inference only"):
        mx.grad(lambda v: kernels.logsumexp(v).sum())(x)
    with pytest.raises(ValueError, match="float32"):
        kernels.logsumexp(x.astype(mx.float16))


# ---- quantized_matmul: decoding's x @ dequantize(w).T, read from the packed weights ----

def _isas():
    """Every instruction-set path of quantized_matmul this CPU can run (x86: up to three)."""
    if kernels.quantized_matmul is None:
        return []
    ours = kernels._cpu_kernels
    found = []
    for isa in ("avx512", "avx2", "baseline"):
        try:
            previous = ours.set_matmul_isa(isa)
        except ValueError:
            continue
        ours.set_matmul_isa(previous)
        found.append(isa)
    return found


@pytest.fixture
def each_isa():
    """Run the test body once per instruction set (yields a switcher), then restore the default."""
    ours = kernels._cpu_kernels
    default = ours.matmul_isa()
    yield lambda isa: ours.set_matmul_isa(isa)
    ours.set_matmul_isa(default)


@needs_kernels
def test_mlxtune_cpu_isa_picks_the_starting_instruction_set():
    """MLXTUNE_CPU_ISA starts the kernels on a set this CPU has (bench_train --isa avx2 runs an
    AVX2 machine's code here); a name it lacks or does not know leaves the best one."""
    import subprocess

    def started(value):
        env = {**os.environ, "MLXTUNE_CPU_ISA": value}
        return subprocess.run([sys.executable, "-c", "from mlxtune.kernels import _cpu_kernels as k;"
                               " print(k.matmul_isa())"], env=env, capture_output=True,
                              text=True, check=True).stdout.strip()

    best = kernels._cpu_kernels.matmul_isa()
    for isa in _isas():
        assert started(isa) == isa
    assert started("avx1024") == best


def _quantized(rows, cols, group_size, bits, dtype, seed=0):
    w, scales, biases = mx.quantize(mx.random.normal((rows, cols), key=mx.random.key(seed)),
                                    group_size=group_size, bits=bits)
    return w, scales.astype(dtype), biases.astype(dtype)


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_dequant_matmul_equals_mlx_both_ways(bits, group_size, dtype, each_isa):
    """Training's x @ W.T and dy @ W from the packed weight: every instruction set, row and
    column tails (13 rows, 77 outputs), one row, a transposed x, and sums longer than one block
    of the weight (8320 terms: two or more parts, added). Against float64 products of MLX's
    de-quantized weight, so only the kernel's own (fixed-order) rounding counts, not a BLAS's."""
    import numpy as np

    for isa in _isas():
        each_isa(isa)
        for rows, n, k, seed in ((13, 77, 384, 0), (1, 40, 128, 1), (3, 40, 8320, 2)):
            w, scales, biases = _quantized(n, k, group_size, bits, dtype, seed=seed + bits)
            dense = np.array(mx.dequantize(w, scales.astype(mx.float32),
                                           biases.astype(mx.float32), group_size=group_size,
                                           bits=bits), dtype=np.float64)
            x = mx.random.normal((rows, k), key=mx.random.key(seed))
            dy = mx.random.normal((n, rows), key=mx.random.key(seed + 7)).T  # strided
            for got, want in (
                    (kernels.dequant_matmul(x, w, scales, biases, group_size, bits, True),
                     np.array(x, dtype=np.float64) @ dense.T),
                    (kernels.dequant_matmul(dy, w, scales, biases, group_size, bits, False),
                     np.array(dy, dtype=np.float64) @ dense)):
                assert got.shape == want.shape
                scale = np.abs(want).max()
                assert np.abs(np.array(got) - want).max() <= 1e-5 * scale, (isa, rows, n, k)


@needs_kernels
def test_dequant_matmul_checks_inputs():
    w, scales, biases = _quantized(64, 128, 32, 4, mx.float16)
    x = mx.ones((2, 128))
    with pytest.raises(ValueError, match="float32 x"):
        kernels.dequant_matmul(x.astype(mx.float16), w, scales, biases, 32, 4, True)
    with pytest.raises(ValueError, match="last axis"):
        kernels.dequant_matmul(x, w, scales, biases, 32, 4, False)  # x @ W wants 64 columns
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.dequant_matmul(x, w, scales, biases, 48, 4, True)
    with pytest.raises(ValueError, match="bits"):
        kernels.dequant_matmul(x, w, scales, biases, 32, 3, True)


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_quantized_matmul_equals_mlx(bits, group_size, dtype, each_isa):
    # 77 output rows (odd: no row tail is special), 1..8 rows of x and 11 (two passes).
    w, scales, biases = _quantized(77, 384, group_size, bits, dtype, seed=bits + group_size)
    s32, b32 = scales.astype(mx.float32), biases.astype(mx.float32)
    dense = mx.dequantize(w, s32, b32, group_size=group_size, bits=bits)
    assert _isas(), "no instruction set found"
    for isa in _isas():
        each_isa(isa)
        for rows in (1, 2, 3, 5, 8, 11):
            x = mx.random.normal((rows, 384), key=mx.random.key(rows))
            got = kernels.quantized_matmul(x, w, scales, biases, group_size, bits)
            want = mx.quantized_matmul(x, w, s32, b32, transpose=True, group_size=group_size,
                                       bits=bits)
            assert got.shape == (rows, 77) and got.dtype == mx.float32
            # fp32 rounding of a 384-term sum, in another order than MLX's.
            tol = 2e-6 * mx.abs(x) @ mx.abs(dense).T + 1e-6
            assert (mx.abs(got - want) <= tol).all().item(), (isa, rows)
            assert (mx.abs(got - x @ dense.T) <= tol).all().item(), (isa, rows)


@needs_kernels
def test_quantized_matmul_views_batches_compile_and_threads(each_isa):
    # A 3-D x, sliced non-contiguous weights, inside mx.compile, and a weight big enough to be
    # split over the threads, on every instruction set.
    w, scales, biases = _quantized(4096, 256, 64, 4, mx.float16, seed=7)
    x = mx.random.normal((2, 3, 256), key=mx.random.key(8))
    dense = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32),
                          group_size=64, bits=4)
    want = x @ dense.T
    for isa in _isas():
        each_isa(isa)
        got = kernels.quantized_matmul(x, w, scales, biases, 64, 4)
        assert got.shape == (2, 3, 4096)
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-4).item(), isa
        half = kernels.quantized_matmul(x, w[::2], scales[::2], biases[::2], 64, 4)
        assert mx.allclose(half, want[..., ::2], rtol=1e-5, atol=1e-4).item(), isa
        fn = mx.compile(lambda x, w, s, b: 2 * kernels.quantized_matmul(x, w, s, b, 64, 4))
        assert mx.allclose(fn(x, w, scales, biases), 2 * want, rtol=1e-5, atol=2e-4).item(), isa


@needs_kernels
def test_quantized_matmul_is_inference_only_and_checks_its_inputs():
    w, scales, biases = _quantized(8, 64, 32, 4, mx.float16)
    x = mx.random.normal((1, 64))
    # Decoding needs no gradient: asking for one is an error, not a silent zero.
    with pytest.raises(RuntimeError, match="inference only"):
        mx.grad(lambda x: kernels.quantized_matmul(x, w, scales, biases, 32, 4).sum())(x)
    with pytest.raises(ValueError, match="bits"):
        kernels.quantized_matmul(x, w, scales, biases, 32, 3)
    with pytest.raises(ValueError, match="group_size"):
        kernels.quantized_matmul(x, w, scales, biases, 16, 4)
    with pytest.raises(ValueError, match="expects"):
        kernels.quantized_matmul(x.astype(mx.float16), w, scales, biases, 32, 4)
    with pytest.raises(ValueError, match="expects"):
        kernels.quantized_matmul(x[:, :32], w, scales, biases, 32, 4)


# ---- rms_norm and rope: MLX's fast ops as one op each, for decoding ----

@needs_kernels
def test_rms_norm_equals_mlx():
    x = mx.random.normal((3, 7, 576), key=mx.random.key(9))
    w = mx.random.normal((576,), key=mx.random.key(10))
    for view in (x, x.transpose(1, 0, 2), x[:, ::2]):  # contiguous and strided rows
        want = mx.fast.rms_norm(view, w, 1e-5)
        assert mx.allclose(kernels.rms_norm(view, w, 1e-5), want, rtol=1e-5, atol=1e-6).item()
    with pytest.raises(RuntimeError, match="inference only"):
        mx.grad(lambda x: kernels.rms_norm(x, w, 1e-5).sum())(x)


@needs_kernels
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims", [64, 32])
def test_rope_equals_mlx(traditional, dims):
    # (batch, heads, tokens, head_dim) as attention passes it: a transposed view.
    x = mx.random.normal((2, 5, 9, 64), key=mx.random.key(11)).transpose(0, 2, 1, 3)
    for offset in (0, 37, mx.array([3, 100])):  # one position, or one per batch row
        want = mx.fast.rope(x, dims, traditional=traditional, base=100000.0, scale=0.5,
                            offset=offset)
        got = kernels.rope(x, dims, traditional, 100000.0, 0.5,
                           offset if isinstance(offset, mx.array) else mx.array(offset))
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item(), offset
    with pytest.raises(ValueError, match="offset"):
        kernels.rope(x, dims, traditional, 1e4, 1.0, mx.array([1, 2, 3]))


@needs_kernels
def test_attention_equals_mlx():
    # 9 query heads on 3 key/value heads; keys and values are views of a longer cache, as
    # mlx-lm's KV cache returns them; masks: none, causal, per-row bool, additive 2-D.
    q = mx.random.normal((2, 9, 3, 64), key=mx.random.key(12))
    k = mx.random.normal((2, 3, 50, 64), key=mx.random.key(13))[:, :, :40]
    v = mx.random.normal((2, 3, 50, 64), key=mx.random.key(14))[:, :, :40]
    masks = [None, "causal", mx.random.uniform(shape=(2, 1, 3, 40), key=mx.random.key(15)) > 0.3,
             mx.random.normal((3, 40), key=mx.random.key(16))]
    for mask in masks:
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        causal = isinstance(mask, str)
        got = kernels.attention(q, k, v, 0.125, causal, None if causal or mask is None else mask)
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item(), mask
    with pytest.raises(ValueError, match="broadcast"):
        kernels.attention(q, k, v, 0.125, False, mx.zeros((5, 40), mx.bool_))


# ---- attention_train: training's and prefill's attention, and its gradient ----

def _sdpa(q, k, v, causal):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3,
                                                mask="causal" if causal else None)


@needs_kernels
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [
    (2, 6, 2, 7, 7, 16),     # grouped heads, fewer rows than a register tile
    (2, 6, 2, 7, 12, 16),    # keys past the queries (a prefill after a cached prompt)
    (1, 4, 4, 70, 70, 20),   # two query blocks, a head size no vector width divides
    (1, 3, 1, 130, 135, 3),  # three blocks, three-wide heads: every loop's scalar tail
])
def test_attention_train_equals_mlx_in_value_and_gradient(shape, causal, each_isa):
    b, heads, kv_heads, n, s, d = shape
    key = mx.random.key(sum(shape))
    # Views as the models make them: (batch, length, heads, dim) transposed.
    q = mx.random.normal((b, n, heads, d), key=key).transpose(0, 2, 1, 3)
    k, v = (mx.random.normal((b, s, kv_heads, d), key=mx.random.key(i)).transpose(0, 2, 1, 3)
            for i in (1, 2))
    cotangent = mx.random.normal((b, heads, n, d), key=mx.random.key(3))
    want_out = _sdpa(q, k, v, causal)
    want_grads = mx.vjp(lambda q, k, v: _sdpa(q, k, v, causal), [q, k, v], [cotangent])[1]
    group = heads // kv_heads
    scores = (q * 0.3) @ mx.repeat(k, group, axis=1).swapaxes(-1, -2)
    if causal:
        scores = mx.where(mx.arange(s)[None] <= mx.arange(n)[:, None] + (s - n), scores, -mx.inf)
    want_lse = mx.logsumexp(scores, axis=-1)
    for isa in _isas():
        each_isa(isa)
        out, lse = kernels.attention_train(q, k, v, 0.3, causal)
        assert mx.allclose(out, want_out, rtol=1e-5, atol=1e-5).item(), isa
        assert mx.allclose(lse, want_lse, rtol=1e-5, atol=1e-5).item(), isa
        dq, dk, dv = kernels.attention_train_grad(q, k, v, out, lse, cotangent, 0.3, causal)
        assert dk.shape == dv.shape == (b, heads, s, d)  # per query head
        dk, dv = (g.reshape(b, kv_heads, group, s, d).sum(axis=2) for g in (dk, dv))
        for got, want in zip((dq, dk, dv), want_grads):
            assert mx.allclose(got, want, rtol=1e-4, atol=1e-5).item(), isa


@needs_kernels
def test_attention_train_splits_over_threads_compiles_and_checks_inputs():
    # Enough query blocks and heads for every thread, inside mx.compile.
    q = mx.random.normal((2, 4, 300, 64), key=mx.random.key(4))
    k, v = (mx.random.normal((2, 2, 300, 64), key=mx.random.key(i)) for i in (5, 6))
    out = mx.compile(lambda q, k, v: kernels.attention_train(q, k, v, 0.3, True)[0])(q, k, v)
    assert mx.allclose(out, _sdpa(q, k, v, True), rtol=1e-5, atol=1e-5).item()
    with pytest.raises(ValueError, match="S >= L"):
        kernels.attention_train(q, k[:, :, :10], v[:, :, :10], 0.3, True)
    with pytest.raises(ValueError, match="float32"):
        kernels.attention_train(q.astype(mx.float16), k, v, 0.3, True)
    with pytest.raises(ValueError, match="lse"):
        kernels.attention_train_grad(q, k, v, out, out, out, 0.3, True)


@needs_kernels
def test_swiglu_equals_mlx():
    from mlx_lm.models.activations import swiglu

    gate = mx.random.normal((8, 1, 1537), key=mx.random.key(17)) * 6  # odd width: a tail
    up = mx.random.normal((8, 1, 1537), key=mx.random.key(18))
    for g, u in ((gate, up), (gate[..., ::2], up[..., ::2])):
        assert mx.allclose(kernels.swiglu(g, u), swiglu(g, u), rtol=1e-5, atol=1e-6).item()
    with pytest.raises(RuntimeError, match="inference only"):
        mx.grad(lambda g: kernels.swiglu(g, up).sum())(gate)


def test_a_module_built_from_older_sources_is_refused_not_a_crash(monkeypatch):
    """A build left from older sources (new code, setup not rerun) falls back to MLX's ops with
    a reason, instead of failing every import of mlxtune."""
    import types

    monkeypatch.setattr(kernels, "_REASON", kernels._REASON)
    old = types.SimpleNamespace(MLX_VERSION=mx.__version__, dequantize=None, softmax_parts=None)
    assert not kernels._usable(old)
    assert kernels._REASON.startswith("built from older sources (no logsumexp, quantized_matmul")
