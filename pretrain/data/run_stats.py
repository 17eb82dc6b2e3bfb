"""What a preprocessing run counts and shows: documents, bytes and tokens written, records left
out by kind (with the first few places), and the progress line."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from pretrain.data.chunk_encoder import EXAMPLES
from pretrain.data.sources import PreprocessError

# Kinds of skipped input, in the order the summary lists them.
SKIP_KINDS = ("empty", "duplicate", "bad", "blank")


class NoDocumentsError(PreprocessError):
    """The input held no document to write (nothing, or only skipped records)."""


@dataclass
class Stats:
    docs: int = 0
    bytes: int = 0
    tokens: int = 0
    skips: Counter = field(default_factory=Counter)  # kind (SKIP_KINDS) -> records left out
    examples: dict[str, list[str]] = field(default_factory=dict)  # kind -> "path:line: reason" of the first

    @property
    def skipped(self) -> int:
        return sum(self.skips.values())

    def note(self, kind: str, example: str) -> None:
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES:
            shown.append(example)


def skip_summary(stats: Stats) -> str:
    """ "3 empty documents, 1 blank line" (or "nothing")."""
    names = {"empty": "empty document", "duplicate": "duplicate", "bad": "bad record", "blank": "blank line"}
    parts = [f"{stats.skips[k]} {names[k]}{'s' if stats.skips[k] != 1 else ''}" for k in SKIP_KINDS if stats.skips[k]]
    return ", ".join(parts) if parts else "nothing"


def require_documents(stats: Stats) -> None:
    if stats.docs == 0:
        raise NoDocumentsError(
            f"the input holds no document to write (skipped: {skip_summary(stats)}); check --input and --json-keys"
        )


def sum_stats(parts: Sequence[Stats]) -> Stats:
    """The partitions' Stats as one run's: counts added, the first few examples in input order."""
    total = Stats()
    for s in parts:
        total.docs += s.docs
        total.bytes += s.bytes
        total.tokens += s.tokens
        total.skips.update(s.skips)
        for kind, examples in s.examples.items():
            for example in examples:
                total.note(kind, example)
    return total


class Progress:
    """A status line with docs/s and MB/s: redrawn in place on a terminal, else every few seconds."""

    def __init__(self, total_bytes: int, *, interval: float | None = None, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.total = total_bytes
        self.start = self.last = time.perf_counter()
        self.docs = self.bytes = self.tokens = self.read = 0

    def update(self, docs: int, nbytes: int, tokens: int, read: int) -> None:
        self.docs += docs
        self.bytes += nbytes
        self.tokens += tokens
        self.read += read
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._show(now)

    def _show(self, now: float) -> None:
        share = f"{min(100.0, 100.0 * self.read / self.total):5.1f}% | " if self.total else ""
        text = f"{share}{self.line(now)}"
        if self.tty:
            print(f"\r{text}\033[K", end="", file=self.stream, flush=True)
        else:
            print(f"progress: {text}", file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        return (
            f"{self.docs} docs, {self.bytes / 1e6:.1f} MB, {self.tokens} tokens in {elapsed:.1f}s "
            f"({self.docs / elapsed:.0f} docs/s, {self.bytes / 1e6 / elapsed:.2f} MB/s)"
        )

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)
