"""KV caches of recent prompts, so a request that starts like an earlier one skips that prefill.

Chat clients resend the whole conversation each turn, and many requests share a system prompt:
their KV entries are the same. After a request finishes, its cache is trimmed to its prompt
(less the last token, which must be fed again to produce the first answer token's logits) and
kept, per adapter (the same tokens give other KV entries under another adapter). A new request
takes a copy of the entry sharing the longest prefix with its prompt, trimmed to that prefix,
and prefills only the rest. mlx-lm's server keeps an `LRUPromptCache` for the same reason.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """At most `max_entries` prompt caches (least recently used dropped first), at most
    `max_bytes` of KV entries in all."""

    def __init__(self, max_entries: int = 16, max_bytes: int = 1 << 30, min_prefix: int = 4):
        self.max_entries, self.max_bytes, self.min_prefix = max_entries, max_bytes, min_prefix
        self.entries: OrderedDict[tuple, tuple[list[int], list, int]] = OrderedDict()
        self.hits = self.misses = 0

    def fetch(self, adapter: str, prompt: list[int]) -> tuple[list | None, list[int]]:
        """(a private cache holding the longest known prefix of `prompt`, the tokens still to
        prefill), or (None, prompt) when nothing useful is kept."""
        best, length = None, 0
        for key, (tokens, _, _) in self.entries.items():
            if key[0] == adapter:
                # At least the prompt's last token must be fed, for its logits.
                n = min(_common(tokens, prompt), len(prompt) - 1)
                if n > length:
                    best, length = key, n
        if best is None or length < self.min_prefix:
            self.misses += 1
            return None, prompt
        self.entries.move_to_end(best)
        tokens, cache, _ = self.entries[best]
        cache = copy.deepcopy(cache)  # the KV cache writes in place: never share it
        if len(tokens) > length:
            trim_prompt_cache(cache, len(tokens) - length)
        self.hits += 1
        return cache, prompt[length:]

    def store(self, adapter: str, prompt: list[int], cache: list) -> None:
        """Keep `cache` (a finished request's: its prompt and answer) trimmed to prompt[:-1]."""
        keep = len(prompt) - 1
        if keep < self.min_prefix or not cache or not can_trim_prompt_cache(cache):
            return
        extra = cache[0].offset - keep
        if extra < 0:
            return
        if extra:
            trim_prompt_cache(cache, extra)
        tokens = list(prompt[:keep])
        key = (adapter, tuple(tokens))
        self.entries.pop(key, None)
        self.entries[key] = (tokens, cache, sum(c.nbytes for c in cache))
        while self.entries and (len(self.entries) > self.max_entries or
                                sum(e[2] for e in self.entries.values()) > self.max_bytes):
            self.entries.popitem(last=False)

    def clear(self, adapter: str | None = None) -> None:
        """Forget every entry (of one adapter, when given: e.g. after it was removed)."""
        for key in [k for k in self.entries if adapter is None or k[0] == adapter]:
            del self.entries[key]
