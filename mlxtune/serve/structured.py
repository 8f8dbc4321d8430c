"""Structured output: a JSON Schema enforced while sampling, one batch row at a time.

llguidance (the Rust grammar engine behind Guidance; no dependencies, wheels for Linux and macOS)
turns the schema into a grammar and, at each step, says which tokens may come next: ~15 us a
token on the built-in model's 49k vocabulary, against ~370 us for outlines-core (xgrammar, ~7 us,
needs PyTorch and Triton). Each constrained row gets its own mlx-lm logits processor, so a batch
mixes constrained and free rows; free rows never pay for it.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from mlxtune.errors import MlxtuneError

# json.dumps' own separators and no free whitespace: a small model cannot wander off into
# endless spaces or newlines between tokens, and the answer reads like ordinary JSON.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@functools.lru_cache(maxsize=4)
def _lltokenizer(tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
    """llguidance's view of `tokenizer` (~1 s to build, so once per served tokenizer)."""
    import llguidance

    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper around the HF one
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise MlxtuneError("structured output needs a fast (tokenizer.json) tokenizer; this "
                           "model's has none")
    return llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size,
                                  eos_token=list(eos_ids))


def grammar_mask(tokenizer, vocab_size: int, schema: dict, where: str = "response_format"):
    """A logits processor that keeps one row's answer inside `schema` (checked already by
    response_format.check_response_format); a MlxtuneError if the engine cannot compile it."""
    import llguidance

    eos_ids = tuple(sorted(tokenizer.eos_token_ids))
    lltok = _lltokenizer(tokenizer, vocab_size, eos_ids)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    if matcher.is_error():
        # e.g. a keyword the engine does not implement, or a pattern it cannot compile.
        reason = " ".join(matcher.get_error().split())  # its messages span lines
        raise MlxtuneError(f"{where}: cannot enforce this schema: {reason}")
    return GrammarMask(matcher, eos_ids, vocab_size)


class GrammarMask:
    """An mlx-lm logits processor for one batch row: every token the grammar forbids next gets
    -inf; the end-of-sequence tokens only where the grammar accepts the answer so far."""

    def __init__(self, matcher, eos_ids: tuple[int, ...], vocab_size: int):
        self.matcher, self.eos_ids, self.vocab_size = matcher, list(eos_ids), vocab_size
        self.words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.seen: int | None = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        """Advance the grammar by the tokens sampled since the last call; mask `logits`."""
        n = tokens.size
        if self.seen is None:
            self.seen = n  # the first call sees the prompt only
        elif n > self.seen:
            for token in tokens[self.seen:n].tolist():
                if not self.matcher.consume_token(token):
                    # The mask forbade it, so this is a bug, not a user error: fail loudly.
                    raise RuntimeError(f"the grammar rejected token {token}: "
                                       f"{self.matcher.get_error()}")
            self.seen = n
        allowed = self.allowed()
        width = logits.shape[-1]
        if width != allowed.size:  # an output head padded past the vocabulary (or short of it)
            allowed = np.pad(allowed[:width], (0, max(0, width - allowed.size)))
        return mx.where(mx.array(allowed), logits, -mx.inf)

    def allowed(self) -> np.ndarray:
        """A bool per vocabulary entry: may it come next?"""
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        bits = np.unpackbits(self.words.view(np.uint8), bitorder="little")[:self.vocab_size]
        allowed = bits.astype(bool)
        # llguidance allows the end once the answer is complete; say so for every EOS id the
        # model may use (chat models often have two), and never before.
        allowed[self.eos_ids] = self.matcher.is_accepting()
        if not allowed.any():
            # A dead end (the engine in an error state): sampling from all -inf would pick an
            # arbitrary token and fail the whole batch; end this row instead.
            allowed[self.eos_ids] = True
        return allowed
