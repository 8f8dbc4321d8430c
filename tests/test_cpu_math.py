"""The CPU fast path's own math (fast exp, SwiGLU, attention, fused output cross-entropy) equals
MLX's and mlx-lm's to float rounding, values and gradients, on every architecture it is used for."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlxtune import cpu_math, fastpath, kernels
from mlxtune.fastpath import prepare_for_training, token_losses

# Custom ops against stock MLX: rerun per compute variant (test.sh --variants).
pytestmark = pytest.mark.numerics


def _close(a, b, tol):
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=tol, atol=tol)


def test_exp_matches_float64_and_never_overflows():
    x = np.linspace(-87, 88, 100_001, dtype=np.float32)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(np.array(cpu_math.exp(mx.array(x))) - ref) / ref) < 1e-6
    edge = np.array(cpu_math.exp(mx.array([-1e4, -200.0, 200.0, 1e4])))
    assert np.all(np.isfinite(edge)) and edge[0] < 1e-37 and edge[-1] > 1e38


def test_swiglu_value_and_grads():
    gate, up = mx.random.normal((3, 5, 40)) * 4, mx.random.normal((3, 5, 40))
    stock = lambda g, u: (nn.silu(g) * u * mx.cos(g)).sum()  # noqa: E731
    ours = lambda g, u: (cpu_math.swiglu(g, u) * mx.cos(g)).sum()  # noqa: E731
    _close(cpu_math.swiglu(gate, up), nn.silu(gate) * up, 1e-5)
    for a, b in zip(mx.grad(ours, (0, 1))(gate, up), mx.grad(stock, (0, 1))(gate, up)):
        _close(a, b, 1e-5)


@pytest.mark.parametrize("keys", [7, 12])  # 12: a cache longer than the queries
@pytest.mark.parametrize("mask", [None, "causal", "bool", "additive"])
@pytest.mark.parametrize("compiled_kernels", [True, False])
def test_attention_matches_mlx_fast_sdpa(keys, mask, compiled_kernels, monkeypatch):
    """In value and gradient: mlxtune's attention kernel where it applies (no mask array), MLX's
    matmuls and the fast-exp softmax otherwise, and without the kernels."""
    calls = []
    if compiled_kernels and kernels.attention_train is not None:
        kernel = kernels.attention_train
        monkeypatch.setattr(kernels, "attention_train", lambda *a: calls.append(1) or kernel(*a))
    else:
        monkeypatch.setattr(kernels, "attention_train", None)
    mx.random.seed(1)
    q, k, v = (mx.random.normal(s) for s in [(2, 6, 7, 16), (2, 2, keys, 16), (2, 2, keys, 16)])
    if mask == "bool":
        mask = mx.random.uniform(shape=(7, keys)) > 0.3
    elif mask == "additive":
        mask = mx.random.normal((7, keys))

    def stock(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)

    def ours(q, k, v):
        return cpu_math.attention(q, k, v, 0.25, mask)

    _close(ours(q, k, v), stock(q, k, v), 1e-5)
    grads = [mx.grad(lambda *a, f=f: (f(*a) * mx.cos(a[0])).sum(), (0, 1, 2))(q, k, v)
             for f in (ours, stock)]
    for a, b in zip(*grads):
        _close(a, b, 1e-5)
    kernel_used = compiled_kernels and kernels.dequantize is not None and not isinstance(
        mask, mx.array)
    assert bool(calls) == kernel_used


@pytest.mark.parametrize("bits, tied", [(4, False), (8, True)])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("compiled_kernels", [True, False])
def test_linear_cross_entropy_matches_logits(bits, tied, chunked, compiled_kernels, monkeypatch):
    """Loss and gradient equal cross_entropy(h @ W.T) for a quantized head, in one piece or in
    vocabulary chunks (the running max and rescaled sums of a big head), with mlxtune's compiled
    kernels and with MLX's ops in their place."""
    calls = []
    if not compiled_kernels:
        monkeypatch.setattr(kernels, "dequantize", None)
        monkeypatch.setattr(kernels, "softmax_parts", None)
        monkeypatch.setattr(kernels, "dequant_matmul", None)
    elif kernels.dequant_matmul is not None:  # the head's products read the packed weight
        real = kernels.dequant_matmul
        monkeypatch.setattr(kernels, "dequant_matmul",
                            lambda *a: calls.append(a[-1]) or real(*a))
    if chunked:
        monkeypatch.setattr(cpu_math, "LOGIT_ELEMENTS", 1000)
    vocab, dim = 300, 64
    mx.random.seed(2)
    base = nn.Embedding(vocab, dim) if tied else nn.Linear(dim, vocab, bias=False)
    base.weight = mx.random.normal((vocab, dim)) * 0.5
    head = base.to_quantized(group_size=32, bits=bits)
    head = (fastpath.DequantizedEmbedding if tied else fastpath.DequantizedLinear).from_quantized(head)
    weight = cpu_math.dequantize(head["weight"], head["scales"], head["biases"], 32, bits)
    if chunked:
        assert len(cpu_math.logit_chunks(vocab, dim, 10)) > 1
    h, targets = mx.random.normal((2, 5, dim)), mx.random.randint(0, vocab, (2, 5))
    cot = mx.random.uniform(shape=(2, 5))

    def ours(h):
        return (cpu_math.linear_cross_entropy(h, head, targets) * cot).sum()

    def stock(h):
        return (nn.losses.cross_entropy(h @ weight.T, targets) * cot).sum()

    _close(cpu_math.linear_cross_entropy(h, head, targets),
           nn.losses.cross_entropy(h @ weight.T, targets), 1e-4)
    _close(mx.grad(ours)(h), mx.grad(stock)(h), 1e-5)
    if compiled_kernels and kernels.dequant_matmul is not None:
        parts = len(cpu_math.logit_chunks(vocab, dim, 10))
        assert calls == [True, False] * parts * 2  # logits and exp(...) @ W, value and grad


def _tiny(arch: str, tied: bool):
    """A random 4-bit model of `arch` (2 layers, hidden 64, grouped-query heads)."""
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{arch}")
    args = {"model_type": arch, "hidden_size": 64, "num_hidden_layers": 2,
            "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "vocab_size": 200, "rope_theta": 10000.0,
            "max_position_embeddings": 128, "tie_word_embeddings": tied, "head_dim": 16}
    mx.random.seed(3)
    model = module.Model(module.ModelArgs.from_dict(args))
    nn.quantize(model, 32, 4)
    model.set_dtype(mx.float32)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("arch", fastpath.STANDARD)
@pytest.mark.parametrize("tied", [True, False])
def test_standard_architectures_match_stock_mlx_lm(arch, tied, monkeypatch):
    """Logits, losses and LoRA gradients of each STANDARD architecture on the CPU path (fast
    MLP, fast attention, fused loss) equal stock mlx-lm's quantized model."""
    name = arch.rsplit(".", 1)[1]
    stock = _tiny(name, tied)
    fast = _tiny(name, tied)
    inputs, targets = mx.random.randint(0, 200, (2, 9)), mx.random.randint(0, 200, (2, 9))
    stock_logits = stock(inputs)  # before the module's attention is swapped below
    mx.eval(stock_logits)
    stock_loss, stock_grad = nn.value_and_grad(
        stock, lambda m: nn.losses.cross_entropy(m(inputs), targets).mean())(stock)
    mx.eval(stock_loss, stock_grad)
    # Put mlx-lm's function back after the test: the swap is per module.
    module = __import__(arch, fromlist=["scaled_dot_product_attention"])
    monkeypatch.setattr(module, "scaled_dot_product_attention",
                        module.scaled_dot_product_attention)
    prepare_for_training(fast, "cpu")
    assert fastpath.use_fast_mlps(fast) == 0  # already swapped, every one
    assert module.scaled_dot_product_attention is fastpath._cpu_sdpa
    calls = []
    monkeypatch.setattr(fastpath, "linear_cross_entropy",
                        lambda *a: calls.append(1) or cpu_math.linear_cross_entropy(*a))

    _close(fast(inputs), stock_logits, 1e-4)
    fast.train()
    loss, grad = nn.value_and_grad(fast, lambda m: token_losses(m, inputs, targets).mean())(fast)
    assert calls, "training did not use the fused head"
    _close(loss, stock_loss, 1e-5)
    for (key, a), (stock_key, b) in zip(tree_flatten(grad), tree_flatten(stock_grad)):
        assert key == stock_key
        _close(a, b, 1e-4)
    calls.clear()
    fast.eval()
    _close(token_losses(fast, inputs, targets).mean(), stock_loss, 1e-5)
    assert not calls, "evaluation should go through the logits"


@pytest.mark.skipif(kernels.dequant_matmul is None, reason=kernels.status())
@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 64)])
def test_dequantized_matmul_kernel_equals_the_blas_path_in_value_and_gradient(bits, group_size,
                                                                             monkeypatch):
    """A quantized layer's x @ W.T and its input gradient through kernels.dequant_matmul (W
    de-quantized into register-tile blocks) equal the de-quantize-then-BLAS path's, and the
    kernel is what ran."""
    layer = nn.QuantizedLinear(192, 80, bias=False, group_size=group_size, bits=bits)
    layer = fastpath.DequantizedLinear.from_quantized(layer)
    x = mx.random.normal((2, 5, 192), key=mx.random.key(3))
    cot = mx.random.normal((2, 5, 80), key=mx.random.key(4))

    def run():
        return mx.vjp(lambda x: cpu_math.dequantized_matmul(x, layer), [x], [cot])

    calls = []
    real = kernels.dequant_matmul
    monkeypatch.setattr(kernels, "dequant_matmul", lambda *a, **k: calls.append(a[-1]) or real(*a))
    (out,), (dx,) = run()
    assert calls == [True, False]  # the forward and the input's gradient
    monkeypatch.setattr(kernels, "dequant_matmul", None)
    (ref_out,), (ref_dx,) = run()
    _close(out, ref_out, 1e-5)
    _close(dx, ref_dx, 1e-5)
