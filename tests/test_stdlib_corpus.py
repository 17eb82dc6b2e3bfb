"""tools/make_stdlib_corpus.py leaves the standard library's test suites and data tables out by
its documented rules (test directories and test_*.py; literal lines over 75%, or digits over 20%
of the non-whitespace characters)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_stdlib_corpus import is_test_file, measure_table  # noqa: E402

CODE = '''"""A module.

Its docstring is prose: 1, 2, 3 and "quoted words" do not make it a table.
"""

import os

TIMEOUT = 30  # seconds


def join(parts, sep=", "):
    """Join the parts."""
    if not parts:
        return ""
    return sep.join(str(p) for p in parts)
'''

CODEC_ROWS = "".join(f"    '\\x{i:02x}'     #  0x{i:02X} -> CHAR {i}\n" for i in range(64))
CODEC_TABLE = "decoding_table = (\n" + CODEC_ROWS + ")\n"
DICT_TABLE = "codepoints = {\n" + "".join(f"    'name{i}': 0x{i:04x},\n" for i in range(64)) + "}\n"
DIGITS = "def test_parse():\n" + "".join(f"    check({i * 7919:012d}.{i:08d}e-{i})\n" for i in range(20))


def test_code_is_kept_and_tables_are_not():
    code = measure_table(CODE)
    assert not code.is_table and code.literal_line_share < 0.2
    assert measure_table(CODEC_TABLE).is_table and measure_table(CODEC_TABLE).literal_line_share > 0.9
    assert measure_table(DICT_TABLE).literal_line_share > 0.9
    digits = measure_table(DIGITS)  # calls of literals are code lines, but mostly digits
    assert digits.literal_line_share < 0.75 and digits.digit_share > 0.2 and digits.is_table


def test_a_long_digit_run_is_measured_at_once():
    """A line of one 100k-digit number (the stdlib's tests have such) must not backtrack."""
    verdict = measure_table("N = (\n    " + "7" * 100_000 + "\n)\n")
    assert verdict.is_table


def run_corpus(tmp_path, *args):
    out = tmp_path / "corpus.jsonl"
    result = subprocess.run(
        [sys.executable, "tools/make_stdlib_corpus.py", "--output", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line)["path"] for line in out.read_text(encoding="utf-8").splitlines()], result.stderr


def test_the_stdlib_corpus_leaves_out_its_tables(tmp_path):
    kept, report = run_corpus(tmp_path, "--report")
    everything, _ = run_corpus(tmp_path, "--keep-tables")
    left_out = set(everything) - set(kept)
    assert set(kept) <= set(everything) and "os.py" in kept and "json/decoder.py" in kept
    # The tables the first sample of the quickstart was made of, when they exist in this Python.
    for table in ("encodings/cp437.py", "html/entities.py", "pydoc_data/topics.py", "stringprep.py"):
        assert table not in kept and (table in left_out) == (table in everything)
    assert f"and {len(left_out)} data-table files" in report
    assert sum(line.startswith("table: ") for line in report.splitlines()) == len(left_out)
    assert 0 < len(left_out) < 0.15 * len(everything)
    assert not any(is_test_file(path) for path in everything)


def test_test_suites_are_left_out_by_path(tmp_path):
    assert is_test_file("test/test_os.py") and is_test_file("idlelib/idle_test/htest.py")
    assert is_test_file("unittest/test/support.py") and is_test_file("lib2to3/tests/data/fixers/x.py")
    assert is_test_file("sqlite3/test_foo.py")
    assert not is_test_file("unittest/case.py") and not is_test_file("contest.py") and not is_test_file("testing.py")
    kept, report = run_corpus(tmp_path, "--keep-tables")
    with_tests, _ = run_corpus(tmp_path, "--keep-tests", "--keep-tables")
    tests = set(with_tests) - set(kept)
    assert tests and all(is_test_file(p) for p in tests) and "unittest/case.py" in kept
    assert f"left out {len(tests)} test-suite files" in report
