"""serve's prefix cache: a prompt that starts like an earlier one prefills only the rest, and the
answers are the same as without the cache."""

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.utils import load_model

from mlxtune.fastpath import prepare_for_inference
from mlxtune.serve.prefix_cache import PrefixCache

# Answers with and without the cache: rerun per compute variant (test.sh --variants).
pytestmark = pytest.mark.numerics


def _answers(model, prompts, prefix=None, key="base", tokens=5):
    """Greedy answers of a BatchGenerator run, fetching from and storing into `prefix`."""
    gen = BatchGenerator(model, completion_batch_size=4, prefill_batch_size=4)
    cached = [prefix.fetch(key, p) if prefix else (None, p) for p in prompts]
    uids = gen.insert([rest for _, rest in cached], caches=[c for c, _ in cached],
                      max_tokens=[tokens] * len(prompts))
    out, done = {uid: [] for uid in uids}, set()
    for _ in range(4 * tokens):
        for r in gen.next()[1]:
            out[r.uid].append(r.token)
            if r.finish_reason is not None:
                done.add(r.uid)
                if prefix is not None and r.prompt_cache:
                    prefix.store(key, prompts[uids.index(r.uid)], r.prompt_cache)
        if len(done) == len(uids):
            break
    gen.close()
    return [out[uid] for uid in uids], [rest for _, rest in cached]


def test_shared_prefixes_prefill_only_the_rest_and_answer_the_same(tiny_qmodel_dir):
    model, _ = load_model(tiny_qmodel_dir)
    prepare_for_inference(model)
    first = [5, 9, 14, 2, 77, 31, 8, 40, 41]
    same_start = first[:6] + [120, 7, 3]
    prompts = [first, same_start, [40, 41, 42, 43, 44, 45]]
    want, _ = _answers(model, prompts)
    prefix = PrefixCache(min_prefix=4)
    assert _answers(model, [first], prefix)[0] == [want[0]]  # a miss: stored afterwards
    got, fed = _answers(model, prompts, prefix)
    assert got == want
    # The same prompt feeds its last token only; one sharing 6 tokens feeds the other 3; an
    # unrelated one (and one under another adapter) feeds everything.
    assert fed == [first[-1:], same_start[6:], prompts[2]]
    assert prefix.fetch("other adapter", first) == (None, first)
    assert prefix.hits == 2
    # Fetching hands out copies: the stored entry still holds its 8 tokens after being used.
    cache, rest = prefix.fetch("base", first)
    assert cache[0].offset == len(first) - 1 and rest == first[-1:]
    mx.eval([c.state for c in cache])


def test_entries_are_bounded():
    prefix = PrefixCache(max_entries=2, min_prefix=1)

    class Cache:  # what store reads of mlx-lm's KVCache
        def __init__(self, n):
            self.offset, self.nbytes = n, 10 * n

        def is_trimmable(self):
            return True

        def trim(self, n):
            self.offset -= n
            return n

    for i in range(3):
        prefix.store("base", [i, 1, 2, 3], [Cache(6)])
    assert [k[1] for k in prefix.entries] == [(1, 1, 2), (2, 1, 2)]  # the oldest dropped
    assert all(e[1][0].offset == 3 for e in prefix.entries.values())  # trimmed to prompt[:-1]
    prefix.max_bytes = 35
    prefix.store("base", [9, 1, 2, 3], [Cache(3)])
    assert len(prefix.entries) == 1
