"""Write a llama-family MLX model folder as a GGUF file that llama.cpp (and our own import) reads.

The inverse of mlxtune/models/gguf.py: Hugging Face names -> GGUF names, q/k rows permuted per head
the way llama.cpp's rope expects them, the byte-level BPE tokenizer (tokens, merges, types,
pre-tokenizer name) and the chat template in the metadata. mlx-lm's own `convert_to_gguf` writes a
SentencePiece ("llama") vocabulary without merges, which is wrong for byte-level BPE models such as
SmolLM2, and refuses quantized folders; the tensors here are written with the `gguf` package,
llama.cpp's own writer and quantizers (F16, Q8_0, Q4_0).
"""

from __future__ import annotations

from contextlib import contextmanager

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxtune.atomic import write_file
from mlxtune.errors import MlxtuneError
from mlxtune.models.folder import read_config

GGUF_TYPES = ("f16", "q8_0", "q4_0")
_ARCHITECTURES = ("llama", "mistral")


def check_gguf_type(kind: str) -> None:
    """Refuse an unknown --gguf-type before any weight loads."""
    if kind not in GGUF_TYPES:
        raise MlxtuneError(f"--gguf-type {kind!r}: choose one of {', '.join(GGUF_TYPES)}")


def _gguf_names() -> tuple[dict, dict]:
    from mlxtune.models import gguf as imp

    # The import's tables are the one source of truth for the names; export inverts them.
    return ({v: k for k, v in imp._LAYER_NAMES.items()}, {v: k for k, v in imp._TOP_NAMES.items()})


def _rename(name: str, layer_names: dict, top_names: dict) -> str | None:
    stem, _, suffix = name.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, i, part = stem.split(".", 3)
        return f"blk.{i}.{layer_names[part]}.{suffix}" if part in layer_names else None
    return f"{top_names[stem]}.{suffix}" if stem in top_names else None


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, interleave the two rope halves."""
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _float_weights(folder: Path, config: dict) -> dict[str, np.ndarray]:
    """Every tensor of the folder in float32, quantized layers de-quantized with their settings."""
    raw = {}
    for file in sorted(folder.glob("*.safetensors")):
        raw.update(mx.load(str(file)))
    quant = config.get("quantization") or {}
    out = {}
    for name, w in raw.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in raw \
                and name.rsplit(".", 1)[0] + ".scales" in raw:
            continue
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{layer}.scales" in raw:
            q = quant.get(layer) if isinstance(quant.get(layer), dict) else quant
            w = mx.dequantize(w, raw[f"{layer}.scales"].astype(mx.float32),
                              raw.get(f"{layer}.biases", mx.array(0)).astype(mx.float32)
                              if f"{layer}.biases" in raw else None,
                              group_size=q["group_size"], bits=q["bits"],
                              mode=q.get("mode", "affine"))
        out[name] = np.array(w.astype(mx.float32))
    return out


def _pre_tokenizer_name(pre: dict | None) -> str:
    from mlxtune.models import gguf as imp

    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
        last = parts[-1] if parts else {}
        if last.get("type") == "ByteLevel" and not last.get("use_regex", True):
            for name, known in imp._PRE_SPLITS.items():
                if splits == known:
                    return name
    raise MlxtuneError(f"GGUF export: this tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) "
                       "has no llama.cpp name we know; export with --dequantize and convert with "
                       "llama.cpp's convert_hf_to_gguf.py")


def _add_tokenizer(writer, folder: Path, config: dict) -> None:
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise MlxtuneError(f"{folder}: no tokenizer.json to put in the GGUF file")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE" or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise MlxtuneError("GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, "
                           "SmolLM, Qwen); export with --dequantize and use llama.cpp's converter")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    size = max(config.get("vocab_size", 0), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for content, i in vocab.items():
        tokens[i] = content
        t = added.get(content)
        types[i] = int(gguf.TokenType.NORMAL) if t is None else \
            int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    tcfg = {}
    if (folder / "tokenizer_config.json").is_file():
        tcfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))

    def token_id(key: str, config_key: str):
        value = tcfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value in vocab:
            return vocab[value]
        ids = config.get(config_key)
        return ids[0] if isinstance(ids, list) and ids else ids

    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        i = token_id(key, f"{key}_id")
        if isinstance(i, int):
            add(i)
    writer.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))
    template = tcfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        writer.add_chat_template(template)


def write_gguf(folder: Path, out: Path, kind: str = "f16") -> Path:
    """Write model folder `folder` (llama family) as GGUF file `out` with weights in `kind`."""
    import gguf

    check_gguf_type(kind)
    config = read_config(folder)
    arch = config.get("model_type")
    if arch not in _ARCHITECTURES:
        raise MlxtuneError(f"GGUF export supports llama-family models ({', '.join(_ARCHITECTURES)})"
                           f"; this one is {arch!r}: export with --dequantize and convert it with "
                           "llama.cpp's convert_hf_to_gguf.py")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    hidden = config["hidden_size"]
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
    with gguf_file(out) as writer:
        writer.add_name(folder.name)
        writer.add_context_length(config.get("max_position_embeddings", 2048))
        writer.add_embedding_length(hidden)
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_dimension_count(config.get("head_dim") or hidden // heads)
        writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
        writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
        writer.add_vocab_size(config["vocab_size"])
        writer.add_file_type({"f16": 1, "q8_0": 7, "q4_0": 2}[kind])
        _add_tokenizer(writer, folder, config)
        layer_names, top_names = _gguf_names()
        for name, w in _float_weights(folder, config).items():
            new = _rename(name, layer_names, top_names)
            if new is None:
                continue  # rotary caches and the like: llama.cpp recomputes them
            if ".attn_q." in new:
                w = permute_rows(w, heads)
            elif ".attn_k." in new:
                w = permute_rows(w, kv_heads)
            if w.ndim == 1:
                writer.add_tensor(new, w.astype(np.float32))  # norms stay fp32, as llama.cpp keeps
            elif qtype == gguf.GGMLQuantizationType.F16 or w.shape[-1] % 32:
                writer.add_tensor(new, w.astype(np.float16))
            else:
                writer.add_tensor(new, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    return Path(out)


@contextmanager
def gguf_file(out: Path, arch: str = "llama"):
    """A GGUFWriter for `out` that writes to a temp file beside it and renames it onto `out` when
    the block ends; on any error the temp file is removed and `out` is left as it was."""
    import gguf

    # No path yet: the file is opened only once the block has added everything, by write_file.
    writer = gguf.GGUFWriter(None, arch)
    yield writer

    def write(tmp: Path) -> None:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    write_file(Path(out), write)
