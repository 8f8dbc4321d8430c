"""The fused decode block (mlxtune/decode_block.py): a decoder block as two compiled ops when
generating on the CPU. Each test compares against the same model with the fused ops switched
off (the one-op kernels and mlx-lm's block), and checks the fused ops really ran (or really did
not, where the block must fall back)."""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlxtune import kernels
from mlxtune.fastpath import prepare_for_inference

pytestmark = [pytest.mark.skipif(kernels.decode_qkv is None, reason="kernels not built"),
              pytest.mark.numerics]

BASE = {"hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "vocab_size": 100, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": False}
ARCHS = {  # module, extra config: plain llama, qwen2 (q/k/v biases), qwen3 (q/k norms)
    "llama": ("llama", {}),
    "llama-traditional-rope": ("llama", {"rope_traditional": True, "head_dim": 64}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),
}


def _model(arch: str, bits: int = 4, group_size: int = 32, seed: int = 0):
    import importlib

    module, extra = ARCHS[arch]
    lib = importlib.import_module(f"mlx_lm.models.{module}")
    mx.random.seed(seed)
    model = lib.Model(lib.ModelArgs.from_dict({"model_type": module, **BASE, **extra}))
    # Random biases and norm weights, so a mix-up of any of them shows.
    noisy = [(k, mx.random.normal(v.shape) * 0.5 + (1.0 if "norm" in k else 0.0))
             for k, v in tree_flatten(model.parameters()) if k.endswith("bias") or "norm" in k]
    model.update(tree_unflatten(noisy))
    nn.quantize(model, group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    return prepare_for_inference(model, "cpu")


class _Count:
    """Counts blocks computed by the fused ops (decode_stack's blocks, decode_block, decode_out
    after update_and_fetch), or switches them off."""

    def __init__(self, monkeypatch, off: bool = False):
        self.calls, self.by_op = 0, Counter()
        for name in ("decode_out", "decode_block", "decode_stack"):
            monkeypatch.setattr(kernels, name, self._counted(getattr(kernels, name), name))
        if off:
            monkeypatch.setattr(kernels, "decode_qkv", None)

    def _counted(self, real, name: str):
        def counted(*args, **kwargs):
            self.calls += len(args[3]) if name == "decode_stack" else 1  # one a layer's keys
            self.by_op[name] += 1
            return real(*args, **kwargs)

        return counted


def _decode_rows(model, prompts: list[list[int]], steps: int):
    """Logits of the last position of each of a batch of equal-length prompts, and of `steps`
    greedy decode steps."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array(prompts), cache=cache)[:, -1]
    out = [logits]
    for _ in range(steps):
        logits = model(mx.argmax(logits, axis=-1)[:, None], cache=cache)[:, -1]
        out.append(logits)
    return mx.stack(out)


def _decode(model, prompt: list[int], steps: int):
    """_decode_rows for one prompt."""
    return _decode_rows(model, [prompt], steps)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64), (4, 128)])
def test_fused_block_equals_one_op_path(arch, bits, group_size, monkeypatch):
    model = _model(arch, bits, group_size)
    prompt = [3, 17, 42, 5, 99, 7, 1]
    with monkeypatch.context() as m:
        _Count(m, off=True)
        want = _decode(model, prompt, 8)
    count = _Count(monkeypatch)
    got = _decode(model, prompt, 8)
    # The 7-token prompt (<= PACKED_ROWS, causal mask) and every step, in both blocks; the
    # prompt block by block (the empty cache grows), each step one call for the whole stack.
    assert count.calls == 2 * 9
    assert count.by_op == {"decode_out": 2, "decode_stack": 8}
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item(), \
        mx.abs(got - want).max().item()


def test_decoding_across_a_kv_buffer_growth_equals_the_one_op_path(monkeypatch):
    """mlx-lm's KVCache grows its buffers 256 positions at a time: the step that needs room
    runs block by block (update_and_fetch grows them), the steps around it as one stack call,
    and every step's logits equal the one-op path's."""
    from mlx_lm.models.cache import make_prompt_cache

    model = _model("qwen2")
    prompt = [(7 * i) % 97 + 1 for i in range(250)]

    def decode():
        cache = make_prompt_cache(model)
        logits = model(mx.array([prompt]), cache=cache)[:, -1]
        out = []
        for _ in range(12):  # positions 250..261: across the first growth at 256
            logits = model(mx.argmax(logits, axis=-1)[:, None], cache=cache)[:, -1]
            out.append(logits)
        assert cache[0].offset == 262 and cache[0].keys.shape[2] == 512
        return mx.stack(out)

    with monkeypatch.context() as m:
        _Count(m, off=True)
        want = decode()
    count = _Count(monkeypatch)
    got = decode()
    # The 250-token prompt runs mlx-lm's blocks (more than PACKED_ROWS tokens); of the 12
    # steps, the one at position 256 goes block by block, the other 11 as stacks.
    assert count.by_op == {"decode_out": 2, "decode_stack": 11}
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item(), mx.abs(got - want).max().item()


def test_weights_replaced_after_decoding_are_read_by_the_stack(monkeypatch):
    """The stack's weights are gathered once: arrays replaced under the same modules (as
    model.update and load_weights do) remake the plan and the gathered weights, so the next
    step reads the new ones."""
    model = _model("llama")
    prompt = [3, 17, 42]
    before = _decode(model, prompt, 3)  # plans every block and gathers the stack's weights
    other = _model("llama", seed=1)
    model.update(tree_unflatten([(k, v) for k, v in tree_flatten(other.parameters())
                                 if k.startswith("model.layers.1.mlp.")]))
    with monkeypatch.context() as m:
        _Count(m, off=True)
        want = _decode(model, prompt, 3)
    count = _Count(monkeypatch)
    got = _decode(model, prompt, 3)
    assert count.by_op["decode_stack"] == 3
    assert not mx.allclose(want, before, atol=1e-3).item()  # the update did change the model
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item(), mx.abs(got - want).max().item()


def _address(a: mx.array) -> int:
    return np.frombuffer(memoryview(a), dtype=np.uint8).__array_interface__["data"][0]


def test_a_stack_step_writes_kv_in_place_unless_another_holder_keeps_the_buffer(monkeypatch):
    """decode_stack writes a step's positions into the KV buffers themselves, as MLX donates an
    input nothing else holds (a whole-buffer copy a layer a step otherwise), also when the step
    was queued behind a running one; a buffer that something else still holds (a snapshot, a
    lazy slice) is copied first and stays as it was."""
    from mlx_lm.models.cache import make_prompt_cache

    model = _model("llama")
    count = _Count(monkeypatch)
    cache = make_prompt_cache(model)

    def step(y):
        y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
        mx.eval(y)
        return y

    y = step(step(step(mx.array([[3, 17, 42]]))))
    before = _address(cache[0].keys)
    y = step(y)
    assert _address(cache[0].keys) == before
    # Steps queued behind one still running (as generation pipelines them): three at once.
    for _ in range(3):
        y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
    mx.eval(y)
    assert _address(cache[0].keys) == before
    held, at = cache[1].values, cache[1].offset
    kept = np.array(held)
    step(y)
    assert np.array_equal(np.array(held), kept)
    assert _address(cache[1].values) != _address(held)
    assert not np.array_equal(np.array(cache[1].values)[..., at, :], kept[..., at, :])
    assert count.by_op["decode_stack"] == 7


_LAST_HOLDER = """
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from tests.test_decode_block import _model

model = _model("llama")
cache = make_prompt_cache(model)
y = mx.array([[3, 17, 42]])
for _ in range(2):
    y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
    mx.eval(y)
for _ in range(40):  # queued, not yet run: each step's op holds the stack's weights
    y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
mx.async_eval(y)
del model.model.__dict__["_mlxtune_stack"]  # Python's reference goes: the ops hold the last
mx.clear_cache()  # waits for MLX's CPU stream with the GIL held
print("done")
"""


def test_the_last_holder_of_the_stack_weights_can_be_an_op_in_flight():
    """The stack's gathered weights outlive Python's reference while queued steps run: their
    release on MLX's CPU stream must not need the GIL (serve's generation thread holds it while
    mx.clear_cache waits for that stream: it hung)."""
    import subprocess
    import sys
    from pathlib import Path

    try:
        done = subprocess.run([sys.executable, "-c", _LAST_HOLDER], capture_output=True,
                              text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        pytest.fail("a step's release of the stack's weights waited for the GIL: deadlock")
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-2000:]


def test_fused_block_equals_one_op_path_on_every_instruction_set(monkeypatch):
    from tests.test_kernels import _isas

    ours = kernels._cpu_kernels
    default = ours.matmul_isa()
    model = _model("qwen3", 4, 64)
    prompt = [3, 17, 42, 5]
    try:
        for isa in _isas():
            ours.set_matmul_isa(isa)
            with monkeypatch.context() as m:
                _Count(m, off=True)
                want = _decode(model, prompt, 4)
            got = _decode(model, prompt, 4)
            assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item(), isa
    finally:
        ours.set_matmul_isa(default)


def test_batched_decode_with_padding_masks(monkeypatch):
    """mlx-lm's BatchGenerator (serve's): left-padded rows of different lengths, each row's
    RoPE offset and padding mask through the fused attention."""
    from mlx_lm.generate import BatchGenerator

    model = _model("qwen2")
    prompts = [[5, 9, 14, 2, 77, 31, 8], [40, 41], [3, 12, 7, 7]]

    def greedy():
        gen = BatchGenerator(model, completion_batch_size=3, prefill_batch_size=3)
        uids = gen.insert(prompts, max_tokens=[6, 6, 6])
        out = {uid: [] for uid in uids}
        for _ in range(20):
            for r in gen.next()[1]:
                out[r.uid].append(r.token)
            if all(len(v) == 6 for v in out.values()):
                break
        gen.close()
        return [out[uid] for uid in uids]

    with monkeypatch.context() as m:
        _Count(m, off=True)
        want = greedy()
    count = _Count(monkeypatch)
    assert greedy() == want
    assert count.calls >= 2 * 5  # the decode steps at least


@pytest.mark.parametrize("dora", [False, True])
def test_lora_layers_fuse_their_delta_and_a_swap_is_noticed(dora, monkeypatch):
    """Planned, then LoRA-wrapped (a module swap, as eval's local backend loads an adapter): the
    block notices; LoRA's delta is added inside the fused ops, equal to mlx-lm's LoRALinear;
    DoRA (a magnitude per output) runs mlx-lm's block."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = _model("qwen2")
    prompt = [3, 17, 42]
    _decode(model, prompt, 1)  # plans every block
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                     "keys": ["self_attn.q_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj",
                                              "mlp.up_proj", "mlp.down_proj"]}, use_dora=dora)
    for layer in model.model.layers:
        for lora in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj,
                     layer.mlp.up_proj):
            lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.1
    model.eval()
    with monkeypatch.context() as m:
        _Count(m, off=True)
        want = _decode(model, prompt, 3)
    count = _Count(monkeypatch)
    got = _decode(model, prompt, 3)
    assert count.calls == (0 if dora else 2 * 4)
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item(), mx.abs(got - want).max().item()
    base = _model("qwen2")
    assert not mx.allclose(got, _decode(base, prompt, 3), atol=1e-3).item()  # it did change


def _served():
    """The llama model with serve's adapter slots on q_proj, v_proj and down_proj: slot 0 the
    base (zeros), slot 1 an adapter."""
    from mlxtune.serve.registry import AdapterSlot, Selection

    model = _model("llama")
    selection = Selection()
    for i, layer in enumerate(model.model.layers):
        for parent, name in (("self_attn", "q_proj"), ("self_attn", "v_proj"),
                             ("mlp", "down_proj")):
            owner = getattr(layer, parent)
            path = f"model.layers.{i}.{parent}.{name}"
            linear = getattr(owner, name)
            out_dims, in_dims = linear.weight.shape[0], linear.weight.shape[1] * 32 // linear.bits
            a = mx.random.normal((2, in_dims, 4)) * 0.1
            b = mx.random.normal((2, 4, out_dims)) * 0.1
            selection.stacks[path] = (a * mx.array([0.0, 1.0])[:, None, None], b, None)
            owner.update_modules({name: AdapterSlot(linear, path, selection)})
    return model, selection


def test_served_adapter_rows_decode_fused_each_with_its_slot_and_scale(monkeypatch):
    """serve's mixed batches: a base row and an adapter row at scale 0.5 in one batch, through the
    fused ops, equal to the per-op path; an all-base batch equals the base model."""
    model, selection = _served()
    prompts = [[3, 17, 42], [5, 8, 13]]
    want_base = _decode_rows(_model("llama"), prompts, 3)
    count = _Count(monkeypatch)
    assert mx.allclose(_decode_rows(model, prompts, 3), want_base, atol=1e-4).item()
    assert count.calls == 2 * 4
    selection.point([0, 1], [1.0, 0.5])
    with monkeypatch.context() as m:
        _Count(m, off=True)
        want = _decode_rows(model, prompts, 3)
    count.calls = 0
    got = _decode_rows(model, prompts, 3)
    assert count.calls == 2 * 4
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item(), mx.abs(got - want).max().item()
    assert mx.allclose(got[:, 0], want_base[:, 0], atol=1e-4).item()  # the base row
    assert not mx.allclose(got[:, 1], want_base[:, 1], atol=1e-3).item()  # the adapter row


def test_served_dora_rows_take_mlx_lm_s_block(monkeypatch):
    model, selection = _served()
    for path, (a, b, _) in list(selection.stacks.items()):
        selection.stacks[path] = (a, b, mx.ones((2, b.shape[-1])))
    selection.point([1], [1.0])
    count = _Count(monkeypatch)
    _decode(model, [3, 17, 42], 2)
    assert count.calls == 0


def test_long_prompts_and_quantized_caches_take_mlx_lm_s_block(monkeypatch):
    from mlx_lm.models.cache import QuantizedKVCache

    model = _model("llama")
    count = _Count(monkeypatch)
    model(mx.array([list(range(40))]))  # no cache, 40 tokens: neither is decoding
    cache = [QuantizedKVCache(group_size=32, bits=8) for _ in model.model.layers]
    model(mx.array([[1, 2, 3]]), cache=cache)
    assert count.calls == 0


def test_ops_refuse_mismatched_weights():
    model = _model("llama")
    layer = model.model.layers[0]
    weights = [layer.self_attn.q_proj[k] for k in ("weight", "scales", "biases")] * 3
    with pytest.raises(ValueError, match="do not match"):
        kernels.decode_qkv(mx.zeros((1, 1, 128)), layer.input_layernorm.weight, weights,
                           mx.array(0), [], eps=1e-5, heads=4, kv_heads=2, head_dim=32,
                           rope_dims=32, traditional=False, rope_base=1e4, rope_scale=1.0,
                           specs=[32, 4] * 3, has_bias=False, has_qk_norm=False, qk_eps=1e-6)
    with pytest.raises(ValueError, match="specs"):
        kernels.decode_qkv(mx.zeros((1, 1, 128)), layer.input_layernorm.weight, weights,
                           mx.array(0), [], eps=1e-5, heads=4, kv_heads=2, head_dim=32,
                           rope_dims=32, traditional=False, rope_base=1e4, rope_scale=1.0,
                           specs=[32, 3] * 3, has_bias=False, has_qk_norm=False, qk_eps=1e-6)
