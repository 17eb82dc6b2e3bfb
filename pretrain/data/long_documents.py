"""Tokenizing a long document in pieces, so that one document of any size needs bounded memory.

Tokenizers hold several times a text's size while encoding it (sentencepiece: about 50 bytes
per input byte); a 1 GB document would need tens of GB. A document longer than `PIECE_CHARS`
is therefore cut into pieces of about that size, each encoded alone, and their ids are joined.

Where to cut: just before a space that follows a non-whitespace character (the start of a run
of spaces), the first such place at or after `PIECE_CHARS` past the previous cut. Sentencepiece
(every space starts a new word; no piece spans one unless the model allows whitespace-only
pieces, which begin a run) and byte-level BPE pre-tokenizers (GPT-2, Llama 3 patterns: no
pre-token runs from a non-space into a space) never join tokens across such a place, so the ids
are the same as encoding the whole document; tests check that on real tokenizers.

Whether a tokenizer keeps that property is probed once, on a few texts cut at such places:
- "plain": encode(a) + encode(b) == encode(a + b); pieces are encoded as they are;
- "drop-space": sentencepiece models with `add_dummy_prefix` prepend a space to every text,
  so each later piece is encoded without its first space, which the prefix stands in for;
- "whole": neither holds; long documents are encoded whole (memory grows with them).
Sentencepiece unigram models are the exception: Viterbi breaks exact ties between
segmentations (a run of digits as 00|000|000 or 000|000|00) by floating-point sums counted from
the start of the text, so a tied stretch in a later piece may be cut the other way (same text,
rarely a different token count); BPE models, sentencepiece's and Hugging Face's, are exact.
A stretch of more than `MAX_PIECE_CHARS` without such a place (a text without spaces, CJK) is
cut at `MAX_PIECE_CHARS`: the tokens around that cut can differ from whole-document ones. Cuts
depend only on the text, so the output stays the same whatever the worker count.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np

from pretrain.data.tokenizer import Tokenizer

PIECE_CHARS = 1 << 20
MAX_PIECE_CHARS = 8 << 20

_CUT = re.compile(r"(?<=\S) ")
_PROBES = (
    "def f(x):\n    return x  + 1   # comment",
    "one two  three   four\tfive \t six\n seven",
    "naïve café, 字 文字 🙂 end. (x) [1, 22, 333]",
    "a  b",
)


def cuts(text: str, *, piece_chars: int = PIECE_CHARS, max_chars: int = MAX_PIECE_CHARS) -> Iterator[tuple[int, int]]:
    """[start, end) of each piece of `text`, in order, covering it."""
    start = 0
    while len(text) - start > piece_chars:
        found = _CUT.search(text, start + piece_chars, start + max_chars)
        end = found.start() if found is not None else start + max_chars
        if end >= len(text):
            break
        yield start, end
        start = end
    yield start, len(text)


def iter_pieces(windows, *, piece_chars: int = PIECE_CHARS, max_chars: int = MAX_PIECE_CHARS) -> Iterator[str]:
    """The pieces `cuts` gives, for a text that comes as consecutive windows (never whole)."""
    buf = ""
    for window in windows:
        buf += window
        while len(buf) > piece_chars:
            found = _CUT.search(buf, piece_chars, max_chars)
            if found is not None:
                end = found.start()
            elif len(buf) >= max_chars:
                end = max_chars
            else:
                break  # the cut may lie in text not yet seen
            yield buf[:end]
            buf = buf[end:]
    if buf:
        yield buf


def _probe_cuts(text: str) -> list[int]:
    return [m.start() for m in _CUT.finditer(text)]


def split_mode(tokenizer: Tokenizer) -> str:
    """ "plain", "drop-space" or "whole": how pieces of a long text are encoded (module doc)."""
    cases = [(t, i) for t in _PROBES for i in _probe_cuts(t)]
    if all(tokenizer.encode(t[:i]) + tokenizer.encode(t[i:]) == tokenizer.encode(t) for t, i in cases):
        return "plain"
    if all(tokenizer.encode(t[:i]) + tokenizer.encode(t[i + 1 :]) == tokenizer.encode(t) for t, i in cases):
        return "drop-space"
    return "whole"


def encode_long(
    tokenizer: Tokenizer,
    text,
    *,
    mode: str,
    dtype: np.dtype,
    suffix: Sequence[int] = (),
    piece_chars: int = PIECE_CHARS,
) -> np.ndarray:
    """The ids of `text` (a str, or a LongText from huge_records.py) and then `suffix`, encoded a
    piece at a time. The ids are gathered as bytes in one growing buffer (extended in place), not
    as a list of arrays joined at the end, which would hold them twice."""
    if isinstance(text, str):
        if mode == "whole":
            return np.asarray(tokenizer.encode(text) + list(suffix), dtype=dtype)
        pieces = (text[a:b] for a, b in cuts(text, piece_chars=piece_chars))
    else:
        windows = text.windows()
        pieces = iter_pieces(windows, piece_chars=piece_chars) if mode != "whole" else iter(["".join(windows)])
    out = bytearray()
    for k, piece in enumerate(pieces):
        # A piece after a cut at a space begins with that space; "drop-space" leaves it to the
        # tokenizer's own dummy prefix.
        if mode == "drop-space" and k > 0 and piece[:1] == " ":
            piece = piece[1:]
        out += np.asarray(tokenizer.encode(piece), dtype=dtype).tobytes()
    out += np.asarray(suffix, dtype=dtype).tobytes()
    return np.frombuffer(out, dtype=dtype)
