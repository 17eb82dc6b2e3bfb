"""Tokenizers behind one small interface: sentencepiece `.model` files and Hugging Face
`tokenizer.json` files (the `tokenizers` library; no download, no `transformers` needed).

`load_tokenizer(path)` picks the backend from the file: a `.json` file, or a directory holding
`tokenizer.json`, is a Hugging Face tokenizer; anything else must be a sentencepiece model.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, runtime_checkable

import sentencepiece as spm

# Control piece reserved by tools/train_tokenizer.py for masked-LM training.
MASK_PIECE = "<mask>"

# Hugging Face tokenizers name their special tokens in many ways; tokenizer_config.json, when
# present beside tokenizer.json, settles it, otherwise the first of these found in the vocab.
_HF_EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]", "<|im_end|>")
_HF_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")
_HF_MASK_NAMES = ("<mask>", "[MASK]", "<|mask|>")
_HF_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[CLS]")
_HF_UNK_NAMES = ("<unk>", "[UNK]", "<|unk|>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the trainer need from a tokenizer."""

    vocab_size: int
    eod: int  # end-of-document id: appended after each document by preprocess --append-eod
    pad: int
    mask: int | None  # masked-LM mask id; None when the tokenizer has no such token

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
        mask = sp.piece_to_id(MASK_PIECE)
        # piece_to_id answers unk for a missing piece; a real mask piece is a control symbol.
        self.mask: int | None = mask if mask != self.unk and sp.is_control(mask) else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], *, num_threads: int | None = None) -> list[list[int]]:
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


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (fast tokenizer), read with the `tokenizers` library.

    Documents are encoded without special tokens (no BOS/EOS from the post-processor):
    preprocessing marks document ends itself with `--append-eod`. A special token spelled in a
    document ("</s>" in an HTML test file) is encoded as the text it is, as sentencepiece does:
    otherwise a document could end itself early, or cut itself in two under
    `data.document_attention_mask`. Truncation and padding settings in the file are ignored: a
    document is never cut or padded. The end-of-document token is `eos_token` from a
    `tokenizer_config.json` beside the file when there is one, else the first of the usual
    names (<|endoftext|>, </s>, ...) present in the vocabulary; bos, pad, unk and mask likewise.
    """

    def __init__(self, path: str) -> None:
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file not found: {path!r}")
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise ValueError(
                f"{path!r} is a Hugging Face tokenizer; install the `tokenizers` package to read it"
            ) from None
        self.path = path
        try:
            self._tok = _HF.from_file(path)
        except Exception as exc:  # the Rust side raises a bare Exception with its message
            raise ValueError(f"{path!r} is not a Hugging Face tokenizer.json: {exc}") from None
        self._json = open(path, encoding="utf-8").read()
        self._encode_as_documents()
        self._init_ids()

    def _encode_as_documents(self) -> None:
        """Special tokens in the text stay text; no truncation or padding (see the class doc)."""
        self._tok.encode_special_tokens = True
        self._tok.no_truncation()
        self._tok.no_padding()

    def _init_ids(self) -> None:
        ids = self._tok.get_vocab(with_added_tokens=True).values()
        if not ids:
            raise ValueError(f"{self.path!r} has an empty vocabulary; train one with tools/train_tokenizer.py")
        # One past the largest id, not the count of pieces: a file whose ids leave gaps would
        # otherwise encode ids at or above model.vocab_size.
        self.vocab_size: int = max(ids) + 1
        config = self._config()
        eod = self._find(config.get("eos_token"), _HF_EOD_NAMES)
        if eod is None:
            raise ValueError(
                f"cannot tell the end-of-document token of {self.path!r}: no eos_token in a "
                f"tokenizer_config.json beside it and none of {list(_HF_EOD_NAMES)} in its vocabulary"
            )
        self.eod: int = eod
        pad = self._find(config.get("pad_token"), _HF_PAD_NAMES)
        self.pad: int = pad if pad is not None else self.eod
        self.mask: int | None = self._find(config.get("mask_token"), _HF_MASK_NAMES)
        self.bos: int | None = self._find(config.get("bos_token"), _HF_BOS_NAMES)
        self.unk: int | None = self._find(config.get("unk_token"), _HF_UNK_NAMES)

    def tokenizer_config(self) -> dict:
        """The tokenizer_config.json under which transformers' AutoTokenizer, reading this
        tokenizer.json, encodes a text to the ids `encode` gives: our special tokens by name,
        special tokens in the text split as text, nothing added around it."""
        names = {"bos_token": self.bos, "eos_token": self.eod, "unk_token": self.unk, "pad_token": self.pad}
        names["mask_token"] = self.mask
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{key: self._tok.id_to_token(i) for key, i in names.items() if i is not None},
            "split_special_tokens": True,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }

    def _config(self) -> dict:
        path = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _find(self, configured: object, names: tuple[str, ...]) -> int | None:
        if isinstance(configured, dict):  # {"content": "</s>", ...}
            configured = configured.get("content")
        for name in ((configured,) if isinstance(configured, str) else ()) + names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], *, num_threads: int | None = None) -> list[list[int]]:
        # The Rust side parallelises batches itself (TOKENIZERS_PARALLELISM, RAYON_NUM_THREADS
        # set the thread count); `num_threads` cannot be changed per call.
        del num_threads
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    # Pickles as its JSON text and resolved ids, so worker processes need no file access.
    def __getstate__(self) -> dict:
        ids = {k: getattr(self, k) for k in ("vocab_size", "eod", "pad", "mask", "bos", "unk")}
        return {"path": self.path, "json": self._json, "ids": ids}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer as _HF

        self.path = state["path"]
        self._json = state["json"]
        self._tok = _HF.from_str(self._json)
        self._encode_as_documents()
        for key, value in state["ids"].items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def load_tokenizer(path: str) -> Tokenizer:
    """Load the tokenizer stored at `path`: a sentencepiece `.model` file, a Hugging Face
    `tokenizer.json`, or a directory holding a `tokenizer.json`."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return HFTokenizer(path)
        raise ValueError(
            f"tokenizer path {path!r} is a directory without a tokenizer.json; pass the sentencepiece "
            ".model file or the Hugging Face tokenizer.json"
        )
    if path.endswith(".json"):
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)
