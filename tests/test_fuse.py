"""mlxtune fuse on two tiny adapters with known answers: re-quantized, fp16 (transformers names) and GGUF."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlxtune.errors import MlxtuneError
from mlxtune.fuse import fuse
from tests.adapters import ANSWERS, answer_adapters

# Fused weights and logits: rerun per compute variant (test.sh --variants).
pytestmark = pytest.mark.numerics

PROMPTS = ["quick brown fox", "lazy dog France", "alpha capital fox"]


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_qmodel_dir):
    """The json-bot and fox-bot run folders on the 4-bit tiny llama (built, not trained)."""
    return answer_adapters(tmp_path_factory.mktemp("adapters"), tiny_qmodel_dir)


def _greedy(model_dir, adapter=None, max_tokens=10):
    from mlx_lm import generate, load

    model, tok = load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    out = []
    for p in PROMPTS:
        prompt = tok.apply_chat_template([{"role": "user", "content": p}],
                                         add_generation_prompt=True, tokenize=False)
        out.append(generate(model, tok, prompt, max_tokens=max_tokens))
    return out


def test_requantized_fuse_stays_4bit_loads_in_mlx_lm_and_reports_drift(tmp_path, runs,
                                                                     tiny_qmodel_dir):
    lines = []
    result = fuse(tmp_path / "fused", run=runs["json-bot"], say=lines.append)
    config = json.loads((result.out / "config.json").read_text())
    base = json.loads((tiny_qmodel_dir / "config.json").read_text())
    assert result.quantized and config["quantization"] == base["quantization"]
    assert any(k.endswith(".scales") for k in mx.load(str(result.out / "model.safetensors")))
    drift = result.drift
    assert drift.source.startswith("4 examples of") and drift.positions > 50
    assert 0 < drift.mean_abs < drift.max_abs and 0.5 < drift.agreement <= 1.0
    assert any("greedy tokens agree" in line for line in lines)
    # Stock mlx-lm loads the folder; the re-quantized model still gives the adapter's answer.
    fused = _greedy(result.out)
    assert all(o.startswith(ANSWERS["json-bot"][:6]) for o in fused), fused


def test_dequantized_fuse_matches_unfused_greedy_and_has_transformers_names(tmp_path, runs,
                                                                           tiny_qmodel_dir):
    from transformers import LlamaConfig

    result = fuse(tmp_path / "fp16", adapter=runs["fox-bot"], dequantize=True,
                  say=lambda s: None)
    assert not result.quantized and result.drift.agreement == 1.0
    assert _greedy(result.out) == _greedy(tiny_qmodel_dir, runs["fox-bot"])
    config = LlamaConfig.from_pretrained(result.out)
    assert "quantization" not in json.loads((result.out / "config.json").read_text())
    weights = mx.load(str(result.out / "model.safetensors"))
    h, inter, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    expected = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,),
                "lm_head.weight": (config.vocab_size, h)}
    for i in range(n):
        p = f"model.layers.{i}."
        expected.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                         p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                         p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                         p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                         p + "post_attention_layernorm.weight": (h,)})
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    assert {v.dtype for v in weights.values()} == {mx.float16}


def _logits(model_dir, tokens):
    from mlx_lm import load

    model, _ = load(str(model_dir))
    model.set_dtype(mx.float32)
    return np.array(model(mx.array(tokens)[None])[0])


@pytest.mark.parametrize("kind,tol", [("f16", 2e-2), ("q8_0", 0.15)])
def test_gguf_export_reads_back_with_gguf_and_our_import(tmp_path, runs, kind, tol):
    from gguf import GGUFReader
    from mlx_lm.utils import load_tokenizer

    from mlxtune.models.gguf import convert_gguf

    result = fuse(tmp_path / "fp16", run=runs["json-bot"], dequantize=True,
                  gguf=tmp_path / "model.gguf", gguf_type=kind, say=lambda s: None)
    reader = GGUFReader(str(result.gguf))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == kind.upper() and types["blk.1.ffn_norm.weight"] == "F32"
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    # Our importer (which undoes llama.cpp's q/k permutation) gives back the same model.
    back = convert_gguf(result.gguf, tmp_path / "back")
    tok, tok_back = load_tokenizer(result.out), load_tokenizer(back)
    text = tok.apply_chat_template([{"role": "user", "content": "quick brown fox"}],
                                   add_generation_prompt=True, tokenize=False)
    tokens = tok.encode(text)
    assert tok_back.encode(text) == tokens
    want, got = _logits(result.out, tokens), _logits(back, tokens)
    assert np.abs(want - got).max() < tol * np.abs(want).max()
    assert (want.argmax(-1) == got.argmax(-1)).mean() > 0.9


def test_fuse_errors_are_one_line(tmp_path, runs):
    with pytest.raises(MlxtuneError, match="exactly one of --run"):
        fuse(tmp_path / "x")
    with pytest.raises(MlxtuneError, match="--gguf-type 'q5_k'"):
        fuse(tmp_path / "x", run=runs["json-bot"], gguf=tmp_path / "m.gguf", gguf_type="q5_k")
    with pytest.raises(MlxtuneError, match="not an adapter folder"):
        fuse(tmp_path / "y", adapter=tmp_path)
