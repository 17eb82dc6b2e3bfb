"""Documents too large to hold as one Python string: a JSONL line or a column value over
`HUGE_BYTES`.

Python stores a string at 1, 2 or 4 bytes per character, the widest character deciding: one
emoji makes a 200 MB document 800 MB of text, and `json.loads` holds the line's text and the
value's at once. A huge value is therefore left as its bytes (the body of a JSON string, or
UTF-8 from Arrow) in a `LongText`, which decodes it a window of about 1 MiB at a time for the
checks, the dedup hash and the tokenizer. Windows are cut just before a space byte (never
inside a UTF-8 sequence or a JSON escape); in a stretch of `MAX_WINDOW` bytes without a space,
at the last place that is neither. The top level of a huge JSONL line is scanned here; a line
this scanner does not follow is parsed with `json.loads` after all (memory as before), which
also gives malformed lines their usual error message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence

import numpy as np

HUGE_BYTES = 16 << 20
WINDOW = 1 << 20
MAX_WINDOW = 8 << 20

_SPACE, _BACKSLASH, _QUOTE = 0x20, 0x5C, 0x22
_HIGH_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}$")
_STRUCTURE = re.compile(rb'[\[\]{}",]')
_WS = b" \t\r\n"


class LongText:
    """A document's text as bytes, decoded a window at a time (module doc)."""

    def __init__(self, raw: np.ndarray, *, json_escaped: bool) -> None:
        self.raw = raw  # uint8, a view: no copy of the line or the Arrow buffer
        self.json_escaped = json_escaped

    def __len__(self) -> int:  # bytes, at least the characters: always over PIECE_CHARS
        return len(self.raw)

    def windows(self) -> Iterator[str]:
        start, n = 0, len(self.raw)
        while start < n:
            end = n if n - start <= WINDOW else self._cut(start)
            piece = self.raw[start:end].tobytes()
            yield json.loads(b'"' + piece + b'"') if self.json_escaped else piece.decode("utf-8")
            start = end

    def _cut(self, start: int) -> int:
        """Where the window from `start` ends: before the first space byte at or after WINDOW."""
        hi = min(len(self.raw), start + MAX_WINDOW)
        spaces = np.flatnonzero(self.raw[start + WINDOW : hi] == _SPACE)
        if len(spaces):
            return start + WINDOW + int(spaces[0])
        if hi == len(self.raw):
            return hi
        p = hi
        while p > start + 1 and not self._boundary(p, start):
            p -= 1
        return p

    def _boundary(self, p: int, start: int) -> bool:
        """True when the text can be cut before byte `p`: not inside a UTF-8 sequence, a JSON
        escape or a surrogate pair spelled as two escapes."""
        if 0x80 <= self.raw[p] < 0xC0:
            return False
        if not self.json_escaped:
            return True
        before = self.raw[max(start, p - 12) : p].tobytes()
        q = before.rfind(b"\\", max(0, len(before) - 6))
        if q >= 0:
            run = len(before[: q + 1]) - len(before[: q + 1].rstrip(b"\\"))
            if run % 2 == 1:  # `before[q]` starts an escape
                length = 6 if before[q + 1 : q + 2] == b"u" else 2
                if q + length > len(before):
                    return False
        return not (_HIGH_SURROGATE_ESCAPE.search(before) and self.raw[p] == _BACKSLASH)


def _skip_ws(data, pos: int) -> int:
    while pos < len(data) and data[pos] in _WS:
        pos += 1
    return pos


def _string_end(data, pos: int) -> int:
    """Index of the quote closing the JSON string whose body starts at `pos`; -1 if none."""
    while True:
        q = data.find(b'"', pos)
        if q < 0:
            return -1
        k = q - 1
        while k >= pos and data[k] == _BACKSLASH:
            k -= 1
        if (q - 1 - k) % 2 == 0:  # an even run of backslashes: the quote is not escaped
            return q
        pos = q + 1


def _value_end(data, pos: int) -> int:
    """Index just past the JSON value that is not a string starting at `pos`; -1 if unclear."""
    depth = 0
    while True:
        m = _STRUCTURE.search(data, pos)
        if m is None:
            return len(data) if depth == 0 else -1
        c, at = data[m.start()], m.start()
        if c == _QUOTE:
            end = _string_end(data, at + 1)
            if end < 0:
                return -1
            pos = end + 1
            continue
        if c in b"[{":
            depth += 1
        elif c in b"]}":
            if depth == 0:
                return at
            depth -= 1
        elif depth == 0:  # a comma at the top
            return at
        pos = at + 1


def _members(data) -> dict[str, tuple[int, int, bool]] | None:
    """key -> (start, end, is_string) of each member of a one-object line (the last of a
    repeated key, as json.loads keeps it); None when the line is not that simple."""
    pos = _skip_ws(data, 0)
    if pos >= len(data) or data[pos] != ord("{"):
        return None
    members: dict[str, tuple[int, int, bool]] = {}
    pos = _skip_ws(data, pos + 1)
    while pos < len(data) and data[pos] != ord("}"):
        if data[pos] != _QUOTE or (key_end := _string_end(data, pos + 1)) < 0:
            return None
        key = json.loads(bytes(data[pos : key_end + 1]))
        pos = _skip_ws(data, key_end + 1)
        if pos >= len(data) or data[pos] != ord(":"):
            return None
        pos = _skip_ws(data, pos + 1)
        if pos < len(data) and data[pos] == _QUOTE:
            end = _string_end(data, pos + 1)
            if end < 0:
                return None
            members[key], pos = (pos + 1, end, True), end + 1
        else:
            end = _value_end(data, pos)
            if end < 0:
                return None
            members[key], pos = (pos, end, False), end
        pos = _skip_ws(data, pos)
        if pos < len(data) and data[pos] == ord(","):
            pos = _skip_ws(data, pos + 1)
    if pos >= len(data) or _skip_ws(data, pos + 1) != len(data):
        return None
    return members


def parse_huge_line(data: bytes | bytearray, keys: Sequence[str]) -> list | None:
    """The values of `keys` in a huge JSONL line: a LongText for a long string, a str for a
    short one, else the parsed value (the caller reports its type); a missing key is a KeyError
    naming the keys present. None when the line must be parsed by json.loads instead."""
    members = _members(data)
    if members is None:
        return None
    raw = np.frombuffer(data, dtype=np.uint8)
    values = []
    for key in keys:
        if key not in members:
            raise KeyError(", ".join(repr(k) for k in list(members)[:10]))
        start, end, is_string = members[key]
        if is_string and end - start > WINDOW:
            values.append(LongText(raw[start:end], json_escaped=True))
        elif is_string:
            values.append(json.loads(bytes(data[start - 1 : end + 1])))
        else:
            values.append(json.loads(bytes(data[start:end])))
    return values
