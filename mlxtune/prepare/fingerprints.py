"""Which examples have been seen: 64-bit fingerprints in one flat array, for deduplication.

A Python set of 16-byte digests costs ~80 bytes an example (a bytes object plus its slot); a
1 GB file of short examples would hold hundreds of MB just to remember them. Open addressing
over an array of uint64 costs 16-21 bytes an example. With 64 bits, two different examples
share a fingerprint with probability n^2 / 2^65: about 3e-6 for ten million examples.
"""

from __future__ import annotations

from array import array


class FingerprintSet:
    """A set of non-negative 64-bit ints, grown by doubling, kept at most half full."""

    def __init__(self, capacity: int = 1 << 16):
        self._slots = array("Q", bytes(8 * capacity))  # zero marks an empty slot
        self._mask = capacity - 1
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, fingerprint: int) -> bool:
        """Add `fingerprint`; False if it was already there."""
        fingerprint = fingerprint or 1
        slots, mask = self._slots, self._mask
        # Fingerprints are uniform hash bits, so their low bits are a fine slot index.
        i = fingerprint & mask
        while True:
            seen = slots[i]
            if seen == 0:
                break
            if seen == fingerprint:
                return False
            i = (i + 1) & mask
        slots[i] = fingerprint
        self._count += 1
        if 2 * self._count > len(slots):
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._slots
        self._slots = array("Q", bytes(16 * len(old)))
        self._mask = 2 * len(old) - 1
        self._count = 0
        for fingerprint in old:
            if fingerprint:
                self.add(fingerprint)
