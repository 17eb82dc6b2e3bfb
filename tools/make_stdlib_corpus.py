"""Write the Python standard library's own source files as a JSONL corpus.

This is the embedded default corpus: every machine that runs Python has it, so the quickstart
needs no download. One line per `.py` file: {"text": <source>, "path": <path under stdlib>}.

    python tools/make_stdlib_corpus.py --output corpus.jsonl [--max-bytes N] [--keep-tables] [--keep-tests]

Test suites are left out: a file under a directory named `test`, `tests` or `idle_test`, or
named `test_*.py`. They are 61% of the library's bytes (19.4 of 31.5 MB on CPython 3.11.7) and
repeat one idiom, `def test_...(self): self.assertEqual(...)`, thousands of times; the
quickstart's model (5M parameters, 1.2M training tokens) learnt that loop before anything else
and its sample after `def ` looped on `test_` names. What is left is the library's own code.
`--keep-tests` writes them.

Data tables are left out. The standard library carries generated tables written as Python
(the codecs' decoding tables in encodings/, html/entities.py, pydoc_data/topics.py,
stringprep.py, _sysconfigdata, test vectors of digits and bytes); a small model trained on
them learns to emit digit strings and hex literals instead of code. A file is skipped when
either holds:

- more than 75% of its lines are literal lines: after stripping, the line holds string or
  number literals and nothing else but brackets, commas, colons, signs and a trailing comment.
  Blank lines, comments, lines of brackets alone and lines that open a triple-quoted string
  (docstrings, doctests) are not counted. The median file has 1.3% literal lines; the tables
  have 89-100%, and only 8 files (0.11 MB, locale.py's alias table the largest) lie between
  60% and 88%, so where the threshold sits in that band changes little.
- digits are more than 20% of its non-whitespace characters (the median file: 1.1%, the 99th
  percentile 19.9%). This adds 7 files of test vectors and tables the first rule misses
  (stringprep.py, encodings/rot_13.py, test_strtod, test_int_literal, test_format, test_wave,
  test_sunau: 85 kB).

On CPython 3.11.7 the test rule leaves out 1,027 of 1,758 files (19.4 MB) and the table rule
79 of the 731 left (2.22 MB, 72 of them in encodings/; `--report` lists each), which writes
652 documents, 9.9 MB; the digits' share of the non-test files' non-whitespace characters falls
from 2.7% to 1.1%. `--keep-tests --keep-tables` writes every file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass

# Third-party packages installed into the interpreter are not "the standard library", and would
# make the corpus differ from machine to machine.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


def is_test_file(rel: str) -> bool:
    """The test-suite rule of the module doc, on a path relative to the library's root."""
    *dirs, name = rel.split(os.sep)
    return name.startswith("test_") or any(d in _TEST_DIRS for d in dirs)


# The table rule (see the module doc for the measured shares): the big tables lie far above
# these thresholds, code files far below; only a few small files sit near them.
MAX_LITERAL_LINE_SHARE = 0.75
MAX_DIGIT_SHARE = 0.20

# One-line string and number literals. Substitution, not one regex over the whole line: a
# pattern repeating alternatives of digit runs backtracks exponentially on long numbers.
_STRING = re.compile(r"""(?<!\w)[rbuRBUfF]{0,2}(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")""")
_NUMBER = re.compile(
    r"(?<![\w.])(?:0[xXoObB][0-9a-fA-F_]+|\d[\d_]*(?:\.\d*)?(?:[eE][-+]?\d+)?[jJlL]?|\.\d+(?:[eE][-+]?\d+)?)"
)
_COMMENT = re.compile(r"#.*")
_PUNCTUATION = re.compile(r"[\s,:;()\[\]{}+\-]*")
_TRIPLE_QUOTE = re.compile(r"""^[rbuRBUfF]{0,2}(?:'''|\"\"\")""")


@dataclass(frozen=True)
class TableVerdict:
    """Why a file is (or is not) a data table: its measured shares."""

    literal_line_share: float
    digit_share: float

    @property
    def is_table(self) -> bool:
        return self.literal_line_share > MAX_LITERAL_LINE_SHARE or self.digit_share > MAX_DIGIT_SHARE


def measure_table(text: str) -> TableVerdict:
    """The two shares the table rule compares (see the module doc)."""
    literal = counted = 0
    for line in text.splitlines():
        line = line.strip()
        # Docstrings and doctests are prose or code inside quotes: never data lines.
        if not line or line[0] == "#" or _TRIPLE_QUOTE.match(line):
            continue
        rest, strings = _STRING.subn("", line)
        rest, numbers = _NUMBER.subn("", _COMMENT.sub("", rest))
        if _PUNCTUATION.fullmatch(rest):
            if not strings + numbers:
                continue  # closing brackets of code or of a table: neither
            literal += 1
        counted += 1
    non_space = len(text) - sum(text.count(c) for c in " \t\n\r\f")
    digits = sum(text.count(c) for c in "0123456789")
    return TableVerdict(literal / max(counted, 1), digits / max(non_space, 1))


def iter_stdlib_sources(root: str) -> Iterator[tuple[str, str]]:
    """Yield (relative path, text) for each UTF-8 `.py` file under `root`.

    Files come in the order of a hash of their relative path: deterministic (the corpus is
    byte-identical across runs and machines with the same Python version) but mixed across
    packages, so a contiguous train/valid split by document, or a --max-bytes prefix, is a fair
    sample of the whole library rather than its alphabetically last packages. Files that are
    not valid UTF-8 (a few deliberately broken test inputs) are skipped: the corpus is JSON text;
    so are empty ones (many `__init__.py`), which preprocessing would reject as empty documents.
    """
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.endswith(".py") and os.path.isfile(path):  # isfile: skip dangling symlinks
                paths.append(os.path.relpath(path, root))
    for rel in sorted(paths, key=lambda rel: hashlib.sha1(rel.encode()).hexdigest()):
        with open(os.path.join(root, rel), "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.isspace() or not text:  # empty __init__.py files carry nothing to learn
            continue
        yield rel, text


@dataclass
class CorpusSummary:
    documents: int = 0
    bytes: int = 0  # UTF-8 text written
    tables: list[tuple[str, int]] | None = None  # (path, bytes) of each file left out as a table
    tests: int = 0  # files of test suites left out
    test_bytes: int = 0

    @property
    def table_bytes(self) -> int:
        return sum(size for _, size in self.tables or ())


def write_corpus(
    output: str, *, root: str, max_bytes: int | None = None, keep_tables: bool = False, keep_tests: bool = False
) -> CorpusSummary:
    """Write the corpus to `output` atomically; return what was written and what was left out.

    With `max_bytes`, stop before the first file that would take the total UTF-8 text size
    past it (useful for quick tests). Unless `keep_tests` and `keep_tables`, test suites and
    data tables (see the module doc) are left out before that count.
    """
    tmp = f"{output}.tmp-{os.getpid()}"
    summary = CorpusSummary(tables=[])
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for rel, text in iter_stdlib_sources(root):
                size = len(text.encode("utf-8"))
                if not keep_tests and is_test_file(rel):
                    summary.tests += 1
                    summary.test_bytes += size
                    continue
                if not keep_tables and measure_table(text).is_table:
                    summary.tables.append((rel, size))
                    continue
                if max_bytes is not None and summary.bytes + size > max_bytes:
                    break
                out.write(json.dumps({"text": text, "path": rel}, ensure_ascii=False))
                out.write("\n")
                summary.documents += 1
                summary.bytes += size
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--max-bytes", type=int, default=None, help="stop before the text exceeds N bytes")
    parser.add_argument(
        "--root",
        default=sysconfig.get_paths()["stdlib"],
        help="directory to collect .py files from (default: this interpreter's standard library)",
    )
    parser.add_argument("--keep-tables", action="store_true", help="keep the data-table files (see above)")
    parser.add_argument("--keep-tests", action="store_true", help="keep the test suites (see above)")
    parser.add_argument("--report", action="store_true", help="list each file left out as a table")
    args = parser.parse_args(argv)
    if args.max_bytes is not None and args.max_bytes <= 0:
        parser.error("--max-bytes must be positive")
    if not os.path.isdir(args.root):
        parser.error(f"--root {args.root!r} is not a directory")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        parser.error(f"the directory of --output does not exist: {out_dir}")

    summary = write_corpus(
        args.output,
        root=args.root,
        max_bytes=args.max_bytes,
        keep_tables=args.keep_tables,
        keep_tests=args.keep_tests,
    )
    print(
        f"wrote {summary.documents} documents, {summary.bytes / 1e6:.1f} MB of text to {args.output}; "
        f"left out {summary.tests} test-suite files, {summary.test_bytes / 1e6:.1f} MB (--keep-tests keeps "
        f"them), and {len(summary.tables)} data-table files, {summary.table_bytes / 1e6:.2f} MB (--keep-tables)",
        file=sys.stderr,
    )
    for rel, size in summary.tables if args.report else ():
        print(f"table: {rel} ({size:,} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
