"""Import a llama-family GGUF file as an MLX model folder, keeping its 4- and 8-bit weights as they are.

`mx.load` reads Q4_0, Q4_1 and Q8_0 tensors straight into MLX's affine quantized layout (weight,
scales, biases; group size 32), so a Q4_1 file becomes a real 4-bit base for QLoRA with no
re-quantization. Other GGUF types arrive de-quantized to float16. The tokenizer and chat template
come from the file's metadata.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import mlx.core as mx

from mlxtune.errors import ModelError
from mlxtune.models.folder import write_model_folder

# GGUF tensor names -> Hugging Face / mlx-lm llama names.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# How llama.cpp splits text before BPE, by `tokenizer.ggml.pre` (from llama.cpp's llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    "default": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT],
    # SmolLM, StarCoder and friends split every digit on its own first.
    "smollm": [r"\p{N}", _GPT2_SPLIT], "starcoder": [r"\p{N}", _GPT2_SPLIT],
    "refact": [r"\p{N}", _GPT2_SPLIT],
    "llama3": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT], "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT],
}
_CONTROL, _USER_DEFINED = 3, 4


def _scalar(meta: dict, key: str, default=None):
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        return value.item()
    return value


def _unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's per-head row interleave of q/k (rows only, so it works on packed arrays)."""
    rows = w.shape[0]
    # llama.cpp stored reshape(heads, 2, d/2).swapaxes(1, 2); the inverse reads it as (heads, d/2, 2).
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _rename(name: str) -> str | None:
    stem, _, suffix = name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if part not in _LAYER_NAMES:
            return None
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    return None


def _model_config(meta: dict, weights: dict) -> dict:
    arch = _scalar(meta, "general.architecture")
    p = f"{arch}."
    heads = _scalar(meta, p + "attention.head_count")
    hidden = _scalar(meta, p + "embedding_length")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _scalar(meta, p + "feed_forward_length"),
        "num_hidden_layers": _scalar(meta, p + "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _scalar(meta, p + "attention.head_count_kv", heads),
        "head_dim": _scalar(meta, p + "rope.dimension_count", hidden // heads),
        "rms_norm_eps": _scalar(meta, p + "attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _scalar(meta, p + "rope.freq_base", 10000.0),
        "max_position_embeddings": _scalar(meta, p + "context_length", 2048),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": _scalar(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _scalar(meta, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float16",
    }
    quant = _quantization(weights)
    if quant:
        config["quantization"] = config["quantization_config"] = quant
    return config


def _quantization(weights: dict) -> dict | None:
    """mlx-lm's `quantization` entry: the common bits/group size, per-layer entries for the rest."""
    found = {}
    for name, w in weights.items():
        if name.endswith(".scales"):
            layer = name[: -len(".scales")]
            packed = weights[f"{layer}.weight"].shape[-1]
            # GGUF's legacy quant types all use blocks of 32 values.
            found[layer] = {"group_size": 32, "bits": packed * 32 // (w.shape[-1] * 32)}
    if not found:
        return None
    common = Counter(tuple(q.items()) for q in found.values()).most_common(1)[0][0]
    quant = dict(common)
    for layer, q in sorted(found.items()):
        if tuple(q.items()) != common:
            quant[layer] = q
    return quant


def _tokenizer_files(meta: dict) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json contents built from the GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _scalar(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(f"GGUF tokenizer type {kind!r} is not supported yet (only byte-level BPE, "
                         "'gpt2'); convert the original Hugging Face folder instead")
    tokens = list(meta["tokenizer.ggml.tokens"])
    kinds = meta.get("tokenizer.ggml.token_type")
    kinds = kinds.tolist() if isinstance(kinds, mx.array) else [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    pre = _scalar(meta, "tokenizer.ggml.pre", "default")
    splits = _PRE_SPLITS.get(pre)
    if splits is None:
        raise ModelError(f"GGUF pre-tokenizer {pre!r} is not supported yet; "
                         f"known: {', '.join(sorted(_PRE_SPLITS))}")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    add_bos = bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False))
    bos_id = _scalar(meta, "tokenizer.ggml.bos_token_id")
    if add_bos and bos_id is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos_id]} $A", pair=f"{tokens[bos_id]} $A $B",
            special_tokens=[(tokens[bos_id], bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, kinds) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, kinds) if k == _USER_DEFINED])

    def token(key: str) -> str | None:
        i = _scalar(meta, key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": bool(_scalar(meta, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": _scalar(meta, f"{_scalar(meta, 'general.architecture')}.context_length",
                                    2048),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}


def read_gguf(path: Path) -> tuple[dict, dict, dict[str, str]]:
    """(weights with mlx-lm names, config.json, tokenizer files) for the llama GGUF at `path`."""
    try:
        raw, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mx.load raises plain RuntimeError/ValueError on a bad file
        raise ModelError(f"{path}: cannot read as GGUF: {e}") from None
    arch = _scalar(meta, "general.architecture")
    if arch != "llama":
        raise ModelError(f"{path}: GGUF architecture {arch!r} is not supported yet (llama only); "
                         "convert the original Hugging Face folder instead")
    heads = _scalar(meta, "llama.attention.head_count")
    kv_heads = _scalar(meta, "llama.attention.head_count_kv", heads)
    weights = {}
    for name, w in raw.items():
        new = _rename(name)
        if new is None:
            continue
        if ".self_attn.q_proj." in new:
            w = _unpermute_rows(w, heads)
        elif ".self_attn.k_proj." in new:
            w = _unpermute_rows(w, kv_heads)
        if mx.issubdtype(w.dtype, mx.floating):
            # llama.cpp keeps norms in fp32; store the model in one float type like mlx-lm does.
            w = w.astype(mx.float16)
        weights[new] = w
    config = _model_config(meta, weights)
    return weights, config, _tokenizer_files(meta)


def convert_gguf(path: Path, out: Path) -> Path:
    """Write the GGUF model at `path` as an MLX model folder at `out`, atomically."""
    weights, config, tokenizer = read_gguf(path)
    return write_model_folder(out, weights, config, tokenizer)
