"""The CPU fast path: de-quantize per layer in fp32, same losses and gradients as MLX's own
quantized path, and the memory of a 4-bit model rather than of its fp32 copy; for generation,
decoding from the packed weights with the same answers as MLX's quantized path."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load_model

from mlxtune import cpu_math, fastpath, kernels
from mlxtune.fastpath import (DequantizedEmbedding, DequantizedLinear, InferenceEmbedding,
                              InferenceLinear, prepare_for_inference, prepare_for_training)

# The CPU path against mlx-lm's: rerun per compute variant (test.sh --variants).
pytestmark = pytest.mark.numerics


def _lora_model(model_dir, fast: bool, layers: int = 2, dora: bool = False):
    model, _ = load_model(model_dir)
    model.freeze()
    mx.random.seed(0)  # same LoRA init in both models
    linear_to_lora_layers(model, layers, {"rank": 4, "scale": 10.0, "dropout": 0.0},
                          use_dora=dora)
    if fast:
        prepare_for_training(model, "cpu")
    else:
        # MLX's own quantized kernels, computing in fp32 as mlxtune does on CPU.
        model.set_dtype(mx.float32)
    return model


def _train(model, batches, compiled: bool = True):
    """Losses of AdamW steps over `batches`, and the LoRA gradients of the first."""
    optimizer = optim.AdamW(learning_rate=1e-2)
    loss_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state]

    def step(batch, lengths):
        (loss, _), grad = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grad)
        return loss, grad

    if compiled:
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    losses, first_grad = [], None
    for batch in batches:
        lengths = mx.array([[0, batch.shape[1] - 1]] * batch.shape[0])
        loss, grad = step(batch, lengths)
        mx.eval(state, loss, grad)
        losses.append(loss.item())
        first_grad = first_grad or dict(tree_flatten(grad))
    return losses, first_grad


def _batches(vocab: int, n: int, shape=(2, 17)):
    return [mx.random.randint(0, vocab, shape, key=mx.random.key(i)) for i in range(n)]


def test_swaps_quantized_layers_only_on_cpu(tiny_qmodel_dir):
    model = _lora_model(tiny_qmodel_dir, fast=False)
    prepare_for_training(model, "metal")
    assert not any(isinstance(m, DequantizedLinear) for _, m in model.named_modules())
    prepare_for_training(model, "cpu")
    swapped = [m for _, m in model.named_modules() if isinstance(m, DequantizedLinear)]
    # Every quantized linear (inside LoRA layers too) is ours and still a QuantizedLinear.
    assert swapped and all(isinstance(m, nn.QuantizedLinear) for m in swapped)
    assert not any(type(m) is nn.QuantizedLinear for _, m in model.named_modules())
    assert model.layers[0].self_attn.q_proj.linear.weight.dtype == mx.uint32
    assert model.model.norm.weight.dtype == mx.float32


@pytest.mark.parametrize("compiled", [True, False])
def test_losses_and_grads_match_mlx_quantized_path(tiny_qmodel_dir, compiled):
    batches = _batches(300, 1) * 3  # one batch thrice: the loss must fall
    ref_losses, ref_grad = _train(_lora_model(tiny_qmodel_dir, fast=False), batches, compiled)
    losses, grad = _train(_lora_model(tiny_qmodel_dir, fast=True), batches, compiled)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-3)
    assert ref_losses[-1] < ref_losses[0] - 0.05  # the steps trained something
    assert grad.keys() == ref_grad.keys() and any("lora_a" in k for k in grad)
    for key, value in ref_grad.items():
        np.testing.assert_allclose(np.array(grad[key]), np.array(value), rtol=1e-3, atol=1e-5)


def test_dora_losses_match(tiny_qmodel_dir):
    """DoRA reads the base weight through the same QuantizedLinear attributes."""
    batches = _batches(300, 1) * 2
    ref_losses, _ = _train(_lora_model(tiny_qmodel_dir, fast=False, dora=True), batches)
    losses, _ = _train(_lora_model(tiny_qmodel_dir, fast=True, dora=True), batches)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-3)


def test_lora_fuse_still_works(tiny_qmodel_dir):
    """mlx-lm's LoRALinear.fuse sees a QuantizedLinear and returns a quantized fused layer."""
    model = _lora_model(tiny_qmodel_dir, fast=True)
    lora = model.layers[0].self_attn.q_proj
    lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.1
    x = mx.random.normal((1, 3, 64))
    assert isinstance(lora.fuse(), nn.QuantizedLinear)  # re-quantized, as mlx-lm does
    fused = lora.fuse(dequantize=True)
    np.testing.assert_allclose(np.array(fused(x)), np.array(lora(x)), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_builtin_model_losses_match(builtin_model_dir):
    """SmolLM2-135M: 4-bit layers and the tied 8-bit embedding used as the output layer."""
    batches = _batches(49152, 2, shape=(1, 33))
    ref_losses, _ = _train(_lora_model(builtin_model_dir, fast=False, layers=4), batches)
    model = _lora_model(builtin_model_dir, fast=True, layers=4)
    assert isinstance(model.model.embed_tokens, DequantizedEmbedding)
    losses, _ = _train(model, batches)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-3)


class _NaiveLinear(nn.QuantizedLinear):
    """De-quantize then matmul, no custom VJP: autograd keeps every fp32 weight for backward."""

    def __call__(self, x):
        w = mx.dequantize(self["weight"], self["scales"].astype(mx.float32),
                          self["biases"].astype(mx.float32), self.group_size, self.bits)
        return x @ w.T


def _peak_of_step(layer_cls) -> tuple[int, int]:
    """Peak bytes of one LoRA step of a random 4-bit llama (8 x hidden 1024), and its weights."""
    from mlx_lm.models import llama

    config = {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 8,
              "intermediate_size": 2816, "num_attention_heads": 8, "num_key_value_heads": 8,
              "rms_norm_eps": 1e-5, "vocab_size": 512, "rope_theta": 10000.0,
              "tie_word_embeddings": False}
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    nn.quantize(model, 32, 4)
    model.freeze()
    linear_to_lora_layers(model, 8, {"rank": 8, "scale": 10.0, "dropout": 0.0})
    prepare_for_training(model, "cpu")
    for _, m in model.named_modules():
        if type(m) is DequantizedLinear and layer_cls is not DequantizedLinear:
            m.__class__ = layer_cls
    mx.eval(model.parameters())
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    batch = mx.random.randint(0, 512, (1, 33))
    lengths = mx.array([[0, 32]])
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    _, grad = nn.value_and_grad(model, default_loss)(model, batch, lengths)
    mx.eval(grad)
    return mx.get_peak_memory() - base, weights


def test_custom_vjp_keeps_memory_of_a_4bit_model():
    naive, weights = _peak_of_step(_NaiveLinear)
    fast, _ = _peak_of_step(DequantizedLinear)
    one_layer_fp32 = 4 * (4 * 1024 * 1024 + 3 * 1024 * 2816)  # ~51 MB
    # Naive: all 8 layers' fp32 weights wait for the backward pass (~410 MB on top of weights).
    assert naive > 6 * one_layer_fp32, (naive, fast, weights)
    # Custom VJP: about one layer's fp32 weight at a time plus small activations.
    assert fast < 2.5 * one_layer_fp32, (naive, fast, weights)


@pytest.mark.parametrize("kernel", [True, False])
def test_long_sequences_keep_the_kernel_attention(kernel, monkeypatch):
    """Past FAST_ATTENTION_SCORES the MLX-op attention (which keeps its probabilities) hands over
    to mlx-lm's; the kernel keeps none and stays, however long the sequence."""
    from mlx_lm.models import base

    if kernel and kernels.attention_train is None:
        pytest.skip(kernels.status())
    if not kernel:
        monkeypatch.setattr(kernels, "attention_train", None)
    taken = []
    stock = base.scaled_dot_product_attention
    monkeypatch.setattr(base, "scaled_dot_product_attention",
                        lambda *a, **kw: taken.append("mlx-lm") or stock(*a, **kw))
    monkeypatch.setattr(fastpath, "FAST_ATTENTION_SCORES", 100)
    q, k, v = (mx.random.normal((1, 4, 12, 8), key=mx.random.key(i)) for i in range(3))
    out = fastpath._cpu_sdpa(q, k, v, None, 0.3, "causal")
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask="causal")
    assert mx.allclose(out, want, rtol=1e-5, atol=1e-5).item()
    assert taken == ([] if kernel else ["mlx-lm"])


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_loss_on_trained_rows_only_equals_the_masked_full_loss(tiny_qmodel_dir, fast, training):
    """masked_loss with the trained positions (the head projects only those) gives the same loss
    and LoRA gradients as the full logits masked afterwards, fused CPU path or not."""
    from mlxtune.train.loop import ROW_BUCKET, masked_loss, trained_rows

    model = _lora_model(tiny_qmodel_dir, fast)
    model.train(training)
    tokens = mx.random.randint(0, 300, (3, 41), key=mx.random.key(7))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = (mx.arange(40)[None] >= mx.array([[25], [3], [40]])).astype(mx.float32)  # one empty
    rows = trained_rows(mask)
    assert rows.shape == (ROW_BUCKET,) and mask.reshape(-1)[rows].sum().item() == 15 + 37
    full = nn.value_and_grad(model, lambda m: masked_loss(m, inputs, targets, mask)[0])(model)
    some = nn.value_and_grad(model, lambda m: masked_loss(m, inputs, targets, mask, rows)[0])(model)
    np.testing.assert_allclose(some[0].item(), full[0].item(), rtol=1e-5)
    for (k, a), (_, b) in zip(tree_flatten(full[1]), tree_flatten(some[1])):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6, err_msg=k)
    assert trained_rows(mx.ones((2, 5))) is None  # nothing to skip: the full path


def _reference(model_dir):
    """The model as mlx-lm loads it, computing in fp32: MLX's quantized_matmul for every layer."""
    model, _ = load_model(model_dir)
    model.set_dtype(mx.float32)
    model.eval()
    return model


def test_inference_keeps_weights_packed_and_picks_the_matmul_by_rows(tiny_qmodel_dir,
                                                                     monkeypatch):
    model, _ = load_model(tiny_qmodel_dir)
    prepare_for_inference(model, "metal")
    assert not any(isinstance(m, DequantizedLinear) for _, m in model.named_modules())
    prepare_for_inference(model, "cpu")
    assert not model.training
    assert type(model.layers[0].self_attn.q_proj) is InferenceLinear
    assert type(model.layers[0].input_layernorm) is fastpath.InferenceRMSNorm
    assert type(model.layers[0].self_attn.rope) is fastpath.InferenceRoPE
    assert model.layers[0].mlp.down_proj.weight.dtype == mx.uint32  # still 4 bits
    calls = []
    for name in ("packed_matmul", "dequantized_matmul"):
        real = getattr(fastpath, name)
        monkeypatch.setattr(fastpath, name, lambda x, layer, real=real, name=name:
                            calls.append(name) or real(x, layer))
    ref = _reference(tiny_qmodel_dir)
    for tokens, path in ((1, "packed_matmul"), (fastpath.PACKED_ROWS, "packed_matmul"),
                         (fastpath.PACKED_ROWS + 1, "dequantized_matmul")):
        calls.clear()
        x = mx.random.randint(0, 300, (1, tokens), key=mx.random.key(tokens))
        got, want = model(x), ref(x)
        assert set(calls) == {path}, (tokens, set(calls))
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4)


def test_batched_generation_equals_mlx_quantized_path(tiny_qmodel_dir):
    """mlx-lm's BatchGenerator (serve's): prompts of different lengths, left-padded, decoded
    together through the packed matmul and the one-op attention with its padding mask."""
    from mlx_lm.generate import BatchGenerator

    prompts = [[5, 9, 14, 2, 77, 31, 8], [40, 41], [3, 120, 7, 7]]

    def greedy(model):
        gen = BatchGenerator(model, completion_batch_size=3, prefill_batch_size=3)
        uids = gen.insert(prompts, max_tokens=[6, 6, 6])
        out, done = {uid: [] for uid in uids}, set()
        for _ in range(20):  # 6 tokens each, and a few steps of prefill
            for r in gen.next()[1]:
                out[r.uid].append(r.token)
                if r.finish_reason is not None:
                    done.add(r.uid)
            if len(done) == len(uids):
                break
        gen.close()
        return [out[uid] for uid in uids]

    ours, _ = load_model(tiny_qmodel_dir)
    prepare_for_inference(ours, "cpu")
    assert greedy(ours) == greedy(_reference(tiny_qmodel_dir))


@pytest.mark.skipif(kernels.logsumexp is None, reason=kernels.status())
def test_generation_log_probabilities_come_from_the_kernel(tiny_qmodel_dir, monkeypatch):
    """After prepare_for_inference on the CPU, mlx-lm's generation (BatchGenerator, serve's;
    generate_step, eval's) normalizes each step's logits with the vectorized logsumexp: the same
    tokens and log-probabilities as with MLX's own, to float rounding."""
    import importlib

    from mlx_lm.generate import BatchGenerator, generate_step

    generate = importlib.import_module("mlx_lm.generate")
    model, _ = load_model(tiny_qmodel_dir)
    prepare_for_inference(model, "cpu")
    assert isinstance(generate.mx, fastpath._GenerationMx)
    calls = []
    monkeypatch.setattr(fastpath, "logsumexp", lambda x: calls.append(x.shape) or
                        cpu_math.logsumexp(x))

    def batched():
        gen = BatchGenerator(model, completion_batch_size=2, prefill_batch_size=2)
        uids = gen.insert([[5, 9, 14, 2], [40, 41]], max_tokens=[5, 5])
        out = {uid: [] for uid in uids}
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append((r.token, r.logprobs))
        gen.close()
        return [out[uid] for uid in uids]

    def single():
        steps = generate_step(mx.array([5, 9, 14, 2]), model, max_tokens=5)
        return [[(int(token), logprobs) for token, logprobs in steps]]

    for run in (batched, single):
        calls.clear()
        fast = run()
        assert calls and {shape[-1] for shape in calls} == {model.args.vocab_size}
        with monkeypatch.context() as stock:
            stock.setattr(generate, "mx", mx)
            want = run()
        for got, ref in zip(fast, want, strict=True):
            assert [t for t, _ in got] == [t for t, _ in ref]
            for (_, a), (_, b) in zip(got, ref):
                np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=2e-5)
    # Other reductions are MLX's.
    x = mx.random.normal((3, 7), key=mx.random.key(2))
    for kwargs in ({"axis": 0, "keepdims": True}, {"axis": -1}, {}):
        assert mx.allclose(generate.mx.logsumexp(x, **kwargs), mx.logsumexp(x, **kwargs)).item()
    assert generate.mx.array is mx.array


@pytest.mark.slow
def test_builtin_model_greedy_answers_equal_mlx_quantized_path(builtin_model_dir):
    """SmolLM2-135M: 4-bit layers, the tied 8-bit head decoded from packed weights; the same
    greedy tokens as MLX's quantized path, logits within 1e-3, at every step."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(builtin_model_dir)
    ours, _ = load_model(builtin_model_dir)
    prepare_for_inference(ours, "cpu")
    assert type(ours.model.embed_tokens) is InferenceEmbedding
    ref = _reference(builtin_model_dir)
    for question in ("What is the capital of France?", "Name three colours."):
        prompt = mx.array(tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True))
        caches = [make_prompt_cache(ours), make_prompt_cache(ref)]
        tokens = [prompt[None], prompt[None]]
        answers = [[], []]
        for _ in range(8):  # the prompt (de-quantized prefill), then decoding steps
            logits = [m(t, cache=c)[:, -1] for m, t, c in zip((ours, ref), tokens, caches)]
            np.testing.assert_allclose(np.array(logits[0]), np.array(logits[1]), atol=1e-3)
            for answer, step in zip(answers, logits):
                answer.append(step.argmax(-1).item())
            assert answers[0] == answers[1], (question, answers)
            tokens = [mx.array([[a[-1]]]) for a in answers]
