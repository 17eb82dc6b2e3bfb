"""Exact deduplication for `tools/preprocess_data.py --dedup exact`.

A record is a duplicate when its normalised text, under every `--json-keys` key, equals an
earlier record's; the first occurrence in input order is kept. Normalised: Unicode NFC, every
run of whitespace (`str.isspace`) replaced by one space, none at the ends; nothing else (case
and punctuation count). Records are compared by a 16-byte BLAKE2b hash of that text (a false
match among 10^12 distinct documents has a chance below 10^-14).

The set of hashes seen is a few sorted numpy arrays (16 bytes per distinct document, up to 32
while two arrays are merged), not a Python set (about 100 bytes per entry).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterator, Sequence

import numpy as np

HASH_BYTES = 16
HASH_DTYPE = np.dtype(f"V{HASH_BYTES}")
# Texts are normalised a window at a time, cut at whitespace, so a long document needs no copy
# of its whole normalised text; NFC never combines across whitespace, so the result is the same.
_WINDOW = 1 << 20
_MAX_WINDOW = 8 << 20
_SPACE = re.compile(r"\s")


def _windows(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    while len(text) - start > _WINDOW:
        found = _SPACE.search(text, start + _WINDOW, start + _MAX_WINDOW)
        end = found.start() if found is not None else start + _MAX_WINDOW
        spans.append((start, end))
        start = end
    spans.append((start, len(text)))
    return spans


def text_windows(text) -> Iterator[str]:
    """`text` (a str, or a LongText from huge_records.py) a window at a time, cut at whitespace."""
    if not isinstance(text, str):
        yield from text.windows()
        return
    for start, end in _windows(text):
        yield text[start:end]


def _update_normalised(h, text) -> None:
    """Feed the normalised form of `text` (module doc) to the hash `h`."""
    pending_space = False  # whitespace seen since the last word fed
    fed = False
    for window in text_windows(text):
        if not window.isascii() and not unicodedata.is_normalized("NFC", window):
            window = unicodedata.normalize("NFC", window)
        words = window.split()
        if not words:
            pending_space = pending_space or bool(window)
            continue
        if fed and (pending_space or window[0].isspace()):
            h.update(b" ")
        h.update(" ".join(words).encode("utf-8"))
        fed = True
        pending_space = window[-1].isspace()


def record_hash(values: Sequence) -> bytes:
    """The 16-byte hash of a record's normalised texts (one per key, kept apart)."""
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    for k, value in enumerate(values):
        if k:
            h.update(b"\x00")  # "a b" + "c" differs from "a" + "b c"
        _update_normalised(h, value)
    return h.digest()


class SeenSet:
    """Hashes seen so far, as sorted runs whose sizes at least double from the newest to the
    oldest (so there are at most log2(n) of them), merged as they fill."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hashes), dtype=bool)
        for run in self._runs:
            at = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            found |= run[at] == hashes
        return found

    def add_new(self, hashes: np.ndarray) -> np.ndarray:
        """Mark which of `hashes` (in input order) are first seen here, and remember them."""
        keep = np.zeros(len(hashes), dtype=bool)
        if not len(hashes):
            return keep
        _, first = np.unique(hashes, return_index=True)  # stable: the first of equal hashes
        keep[first] = True
        keep &= ~self.contains(hashes)
        self._add(np.sort(hashes[keep]))
        return keep

    def _add(self, run: np.ndarray) -> None:
        if not len(run):
            return
        self._runs.append(run)
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            newer = self._runs.pop()
            self._runs[-1] = np.sort(np.concatenate([self._runs[-1], newer]))


def as_hashes(digests: Sequence[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(digests), dtype=HASH_DTYPE).copy()
