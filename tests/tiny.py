"""Tiny random llama models for tests: built in-process with a tokenizer trained on the spot."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = ["The capital of France is Paris.", "Translate to JSON: name Ada, age 36.",
           "{\"name\": \"Ada\", \"age\": 36}", "Question: what is two plus two? Answer: four.",
           "the quick brown fox jumps over the lazy dog 0123456789 ,.;:!?'\"()[]{}<>-_=+*/\\"]


def train_tokenizer(out: Path, vocab_size: int = 320) -> None:
    """A byte-level BPE tokenizer trained on a small corpus, saved as tokenizer.json + config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "add_bos_token": False, "chat_template": CHAT_TEMPLATE, "model_max_length": 512,
    }))


def make_tiny_llama(out: Path, bits: int | None = None, layers: int = 2, hidden: int = 64,
                    seed: int = 0) -> Path:
    """Save a random llama (`layers` x `hidden`) with its tokenizer to `out`; 4/8-bit if `bits`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.utils import quantize_model, save_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out)
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    config = {
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": hidden * 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "vocab_size": len(vocab) + 3, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if bits:
        model, config = quantize_model(model, config, group_size=32, bits=bits)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    save_config(config, out / "config.json")
    return out
