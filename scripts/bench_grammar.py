"""What a JSON-Schema-constrained token costs with each grammar engine, on the built-in model's
tokenizer (49,152 tokens), in one run so a loaded machine loads them alike.

    python scripts/bench_grammar.py [--model smollm2-135m]

Engines not installed are skipped (mlxtune depends on llguidance only; for the comparison,
`pip install outlines-core` and `pip install xgrammar`, which needs PyTorch). Each engine
compiles the same schema, then walks a valid 24-person answer (~590 tokens) computing the
next-token mask before every token and advancing by it: the per-token work serve adds to a
constrained row.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version

import numpy as np

SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                     "city": {"type": "string"}},
    "required": ["name", "age", "city"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False}
CITIES = ["Paris", "Lyon", "Berlin", "Rome", "Madrid", "Oslo", "Lisbon", "Vienna"]


def _allowed(words: np.ndarray, token: int) -> bool:
    return bool((int(words.reshape(-1)[token >> 5]) >> (token & 31)) & 1)


def llguidance_engine(backend, vocab: int, eos: int):
    import llguidance

    lltok = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab, eos_token=eos)
    words = np.zeros((vocab + 31) // 32, np.int32)

    def start():
        m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
        assert not m.is_error(), m.get_error()
        return m

    def step(m, token):
        m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        assert _allowed(words, token) and m.consume_token(token)
    return start, step


def outlines_engine(backend, vocab: int, eos: int):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    # GPT-2 byte-level alphabet back to bytes: outlines-core wants each token's bytes.
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs = bs[:] + [256 + i for i in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    to_byte = {chr(c): b for b, c in zip(bs, cs)}
    tokens: dict[bytes, list[int]] = {}
    for text, i in backend.get_vocab(with_added_tokens=False).items():
        if i != eos and all(ch in to_byte for ch in text):
            tokens.setdefault(bytes(to_byte[ch] for ch in text), []).append(i)
    vocabulary = Vocabulary(eos, tokens)
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    words = np.zeros((vocab + 31) // 32, np.int32)

    def step(guide, token):
        guide.write_mask_into(words.ctypes.data, words.size, 4)
        assert _allowed(words, token)
        guide.advance(token)
    return lambda: Guide(Index(regex, vocabulary)), step


def xgrammar_engine(backend, vocab: int, eos: int):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    info = xgr.TokenizerInfo.from_huggingface(
        PreTrainedTokenizerFast(tokenizer_object=backend), vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    words = xgr.allocate_token_bitmask(1, vocab)

    def step(m, token):
        m.fill_next_token_bitmask(words)
        assert _allowed(words.numpy(), token) and m.accept_token(token)
    return lambda: xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA))), step


def main() -> None:
    """Time compile and per-token mask + advance for each installed engine."""
    from tokenizers import Tokenizer

    from mlxtune.models.resolve import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    folder = resolve_model(args.model)
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    eos = backend.token_to_id("<|im_end|>") or 0
    answer = json.dumps({"people": [{"name": f"Person number {i} Smith", "age": 20 + i,
                                     "city": CITIES[i % 8]} for i in range(24)]})
    ids = backend.encode(answer, add_special_tokens=False).ids
    print(f"{args.model}: vocabulary {vocab}, answer {len(ids)} tokens")
    for name, package, engine in [("llguidance", "llguidance", llguidance_engine),
                                  ("outlines-core", "outlines-core", outlines_engine),
                                  ("xgrammar", "xgrammar", xgrammar_engine)]:
        try:
            start, step = engine(backend, vocab, eos)
        except ImportError as e:
            print(f"{name:>14}: not installed ({e})")
            continue
        t0 = time.perf_counter()
        state = start()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for token in ids:
            step(state, token)
        per_token = (time.perf_counter() - t0) / len(ids)
        print(f"{name:>14} {version(package):>8}: compile {compile_s * 1e3:7.1f} ms, "
              f"{per_token * 1e6:7.1f} us a token (mask + advance)")


if __name__ == "__main__":
    main()
