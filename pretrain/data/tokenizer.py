"""Tokenizers behind one small interface.

Only the sentencepiece backend exists so far (the quickstart trains one with
`tools/train_tokenizer.py`); a Hugging Face `tokenizer.json` backend can sit beside it and be
picked by `load_tokenizer` from the file it is given.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import sentencepiece as spm


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the trainer need from a tokenizer."""

    vocab_size: int
    eod: int  # end-of-document id: appended after each document by preprocess --append-eod
    pad: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str], *, num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts at once, in parallel where the backend can (None: its default)."""
        ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece `.model` file; its `eos` piece is the end-of-document token."""

    def __init__(self, path: str, *, num_threads: int | None = None) -> None:
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer model not found: {path!r} (train one with tools/train_tokenizer.py)")
        with open(path, "rb") as f:
            proto = f.read()
        self.path = path
        # sentencepiece threads: None means one per available core.
        self.num_threads = num_threads if num_threads is not None else (os.cpu_count() or 1)
        self._init_from_proto(proto)

    def _init_from_proto(self, proto: bytes) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise ValueError(f"{self.path!r} is not a sentencepiece model file: {exc}") from None
        if sp.eos_id() < 0:
            raise ValueError(
                f"sentencepiece model {self.path!r} has no eos piece; it is needed as the "
                "end-of-document token (train with tools/train_tokenizer.py, which sets eos_id=2)"
            )
        self._sp = sp
        self._proto = proto
        self.vocab_size: int = sp.vocab_size()
        self.eod: int = sp.eos_id()
        # Padding positions are masked out of the loss, so any id works when the model has no
        # pad piece; the end-of-document id is the conventional stand-in.
        self.pad: int = sp.pad_id() if sp.pad_id() >= 0 else self.eod
        self.bos: int = sp.bos_id()
        self.unk: int = sp.unk_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], *, num_threads: int | None = None) -> list[list[int]]:
        # sentencepiece encodes a list on its own thread pool, without the GIL.
        threads = self.num_threads if num_threads is None else num_threads
        return self._sp.encode(list(texts), num_threads=threads)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    # The C++ processor does not pickle; carry the model bytes so the tokenizer can be sent to
    # worker processes (DataLoader workers, multiprocessing pools).
    def __getstate__(self) -> dict:
        return {"path": self.path, "num_threads": self.num_threads, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self.num_threads = state["num_threads"]
        self._init_from_proto(state["proto"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def load_tokenizer(path: str) -> Tokenizer:
    """Load the tokenizer stored at `path` (a sentencepiece `.model` file for now)."""
    if os.path.isdir(path):
        raise ValueError(
            f"tokenizer path {path!r} is a directory; pass the sentencepiece .model file inside it"
        )
    return SentencePieceTokenizer(path)
