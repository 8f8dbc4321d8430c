"""Model resolution, the GGUF import of the built-in model, conversion, info, and their errors."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxtune.errors import ModelError
from mlxtune.models.builtin import builtin_gguf
from mlxtune.models.convert import convert_model
from mlxtune.models.folder import is_model_folder
from mlxtune.models.gguf import _unpermute_rows
from mlxtune.models.info import model_info
from mlxtune.models.resolve import resolve_model
from tests.test_cli import invoke

# Logits of converted models: rerun per compute variant (test.sh --variants).
pytestmark = pytest.mark.numerics

PROMPT = "What is the capital of France?"


def _reference_weights(gguf_path: Path, config: dict) -> dict:
    """fp32 weights de-quantized by gguf's own numpy code, q/k un-permuted in float space."""
    import gguf

    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    out = {}
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        parts = t.name.split(".")
        if parts[0] == "blk":
            part = names[parts[2]]
            heads = {"attn_q": config["num_attention_heads"],
                     "attn_k": config["num_key_value_heads"]}.get(parts[2])
            if heads:
                # llama.cpp's permute was reshape(h, 2, d/2).swapaxes(1, 2); invert it.
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            out[f"model.layers.{parts[1]}.{part}.weight"] = w
        elif t.name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            out["model.norm.weight"] = w
    return out


@pytest.mark.slow
def test_builtin_logits_match_a_numpy_dequantized_reference(builtin_model_dir):
    from mlx_lm.models import llama
    from mlx_lm.utils import load

    model, tokenizer = load(str(builtin_model_dir))
    model.set_dtype(mx.float32)  # de-quantize in fp32, as the reference does
    config = json.loads((builtin_model_dir / "config.json").read_text())
    reference = llama.Model(llama.ModelArgs.from_dict(config))
    weights = _reference_weights(builtin_gguf("smollm2-135m"), config)
    reference.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    ids = mx.array([tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                  add_generation_prompt=True)])
    ours, theirs = model(ids), reference(ids)
    assert ours.shape == (1, ids.shape[1], 49152)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-2, rtol=0)
    # Same next token everywhere, not just close numbers.
    assert (mx.argmax(ours, -1) == mx.argmax(theirs, -1)).all().item()


@pytest.mark.slow
def test_builtin_answers_paris(builtin_model_dir):
    from mlx_lm import generate, load

    model, tokenizer = load(str(builtin_model_dir))
    model.set_dtype(mx.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                           add_generation_prompt=True, tokenize=False)
    answer = generate(model, tokenizer, prompt, max_tokens=12)
    assert "Paris" in answer


def test_builtin_tokenizer_matches_gguf_vocabulary(builtin_model_dir):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(builtin_model_dir)
    assert tok.eos_token == "<|im_end|>"
    ids = tok.encode("Hello world 2024<|im_end|>", add_special_tokens=False)
    # SmolLM splits digits one by one and keeps special tokens whole.
    assert tok.convert_ids_to_tokens(ids) == ["Hello", "Ġworld", "Ġ", "2", "0", "2", "4",
                                              "<|im_end|>"]
    assert tok.decode(ids) == "Hello world 2024<|im_end|>"


def test_builtin_config_is_4bit_with_8bit_embeddings(builtin_model_dir):
    config = json.loads((builtin_model_dir / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    info = model_info(builtin_model_dir)
    assert info["architecture"] == "llama" and info["layers"] == 30
    assert 134e6 < info["parameters"] < 136e6
    assert info["disk_gb"] < 0.1


def test_unpermute_inverts_llama_cpp_permute():
    w = mx.arange(8 * 6).reshape(8, 6)
    permuted = w.reshape(2, 2, 2, 6).swapaxes(1, 2).reshape(8, 6)  # llama.cpp, 2 heads
    assert mx.array_equal(_unpermute_rows(permuted, 2), w)


def test_resolve_local_folder_and_errors(tiny_model_dir, tmp_path):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model folder"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="no model"):
        resolve_model("./no-such-thing")


def test_resolve_hub_repo_from_an_offline_cache(tiny_model_dir, tmp_path):
    import huggingface_hub.constants as hc

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(hc.HF_HUB_CACHE) / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_model("acme/tiny-llama") == snapshot
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        resolve_model("acme/not-cached")


def test_convert_quantizes_and_mlx_lm_loads_it(tiny_model_dir, tmp_path):
    from mlx_lm.utils import load

    out = convert_model(str(tiny_model_dir), tmp_path / "q8", bits=8, group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    model, tokenizer = load(str(out))
    assert tokenizer.encode("The capital") == load(str(tiny_model_dir))[1].encode("The capital")
    assert model_info(out)["quantization"].startswith("8-bit")


def test_killed_conversion_leaves_no_model_folder(tiny_model_dir, tmp_path, monkeypatch):
    import mlx_lm.utils

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill would, half-way through writing

    monkeypatch.setattr(mlx_lm.utils, "save_config", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_model(str(tiny_model_dir), tmp_path / "out", bits=4, group_size=32)
    assert not (tmp_path / "out").exists()
    assert not any(is_model_folder(p) for p in tmp_path.iterdir())


def test_models_path_prints_only_the_path(tiny_model_dir, isolated_home):
    result = invoke("models", "path", str(tiny_model_dir))
    assert result.exit_code == 0 and result.stdout == f"{tiny_model_dir.resolve()}\n"
