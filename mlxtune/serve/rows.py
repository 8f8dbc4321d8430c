"""Which adapter each row of a mixed batch computes with, carried where the rows go.

mlx-lm's BatchGenerator moves rows between its queue, its prefill batch and its decode batch,
merging, splitting, filtering and extracting their KV caches as it goes, and calls the model with
a batch's cache list and nothing else. So a row's adapter travels as one more entry of its cache
list (`RowTag`): every one of those operations applies to it exactly as to the row's keys and
values, and `MixedModel` reads it off the cache list the model is called with. No bookkeeping of
row order outside BatchGenerator can drift from it.
"""

from __future__ import annotations

import mlx.core as mx

from mlxtune.serve.registry import Selection


class RowTag:
    """The adapter slot and scale of each row of a batch, as the last entry of its cache list."""

    def __init__(self, slots: list[int], scales: list[float]):
        self.slots, self.scales = list(slots), list(scales)

    # The cache protocol BatchGenerator uses: one tag per row, merged and split with the rows.
    @classmethod
    def merge(cls, tags: list[RowTag]) -> RowTag:
        """One tag for the rows of `tags`, in order."""
        return cls([s for t in tags for s in t.slots], [s for t in tags for s in t.scales])

    def extend(self, other: RowTag) -> None:
        """Append `other`'s rows."""
        self.slots += other.slots
        self.scales += other.scales

    def filter(self, keep: list[int]) -> None:
        """Keep only rows `keep`, in that order."""
        self.slots = [self.slots[i] for i in keep]
        self.scales = [self.scales[i] for i in keep]

    def extract(self, idx: int) -> RowTag:
        """Row `idx` alone."""
        return RowTag([self.slots[idx]], [self.scales[idx]])

    def prepare(self, **kwargs) -> None:
        """Nothing to pad: a tag is per row, not per position."""

    def finalize(self) -> None:
        """Nothing to undo."""

    @property
    def state(self) -> list:
        """No arrays to evaluate."""
        return []

    @property
    def nbytes(self) -> int:
        """Counts for nothing in the KV budget."""
        return 0

    def is_trimmable(self) -> bool:
        """Trimming positions leaves the rows' adapters as they are."""
        return True

    def trim(self, n: int) -> int:
        """Positions are not kept here: trimming any number is a no-op."""
        return n


class MixedModel:
    """The model as BatchGenerator sees it: before each call, point the adapter slots at the
    calling batch's rows (read from its RowTag), then run the real model on the rest of the
    cache list."""

    def __init__(self, model, selection: Selection):
        self.model, self.selection = model, selection

    def __call__(self, inputs, cache=None, **kwargs):
        """Logits of `inputs`, each row with its own adapter and scale."""
        tag = cache[-1] if cache and isinstance(cache[-1], RowTag) else None
        if tag is None:
            self.selection.rows = self.selection.scales = None
        else:
            self.selection.point(tag.slots, tag.scales)
            cache = cache[:-1]
        return self.model(inputs, cache=cache, **kwargs)

    def __getattr__(self, name):
        # make_cache, layers, args ... are the real model's.
        return getattr(self.model, name)


def seeded_sampler(temperature: float, top_p: float, seed: int):
    """A sampler with its own random stream: the same seed gives the same draws whatever else
    shares the batch (the global stream is shared by every row)."""
    from mlx_lm.sample_utils import apply_top_p

    key = [mx.random.key(seed)]

    def sample(logprobs: mx.array) -> mx.array:
        if temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        key[0], draw = mx.random.split(key[0])
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1 / temperature), key=draw)

    return sample
